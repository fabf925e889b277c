"""Property-based tests (hypothesis): whatever a user writes in a config or a Parquet file, the
answer is a valid object or an error that names the problem, never a crash from deep inside."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from negatron.cluster.config import Config, ConfigError, all_keys, dump_yaml, load_config
from negatron.trainers.schema import PAIRS, SchemaError, check_pairs

KEYS = all_keys()
# NEGATRON_HYPOTHESIS_EXAMPLES raises the bound for a longer local search
SETTINGS = settings(max_examples=int(os.environ.get("NEGATRON_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _names_a_key(msg: str, key: str) -> bool:
    return key in msg or key.split(".")[-1] in msg or any(k in msg for k in KEYS)


@SETTINGS
@given(key=st.sampled_from(KEYS), value=values)
def test_any_override_value_is_accepted_or_named(key, value):
    try:
        cfg = load_config(None, [f"{key}={_flow(value)}"])
    except ConfigError as e:
        assert _names_a_key(str(e), key), str(e)
        return
    # whatever was accepted survives a write and a read unchanged
    assert load_config_text(dump_yaml(cfg)) == cfg


def load_config_text(text: str) -> Config:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text)
        return load_config(p)


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_override_string_is_parsed_or_refused(text):
    try:
        load_config(None, [text])
    except ConfigError as e:
        assert str(e)


@SETTINGS
@given(doc=st.one_of(st.text(max_size=300), values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
                     st.dictionaries(st.sampled_from(sorted({k.split(".")[0] for k in KEYS}) + ["bogus"]),
                                     st.dictionaries(st.text(max_size=12), scalars, max_size=3), max_size=3)
                     .map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_any_config_file_loads_or_gives_a_config_error(doc):
    try:
        cfg = load_config_text(doc)
    except ConfigError as e:
        assert str(e).strip()
    else:
        assert isinstance(cfg, Config)


# -- Parquet schema -------------------------------------------------------------------------------

def _column(kind: str, n: int, draw) -> pa.Array:
    opt_text = st.one_of(st.none(), st.text(max_size=6))
    if kind == "string":
        return pa.array(draw(st.lists(opt_text, min_size=n, max_size=n)), type=pa.string())
    if kind == "int":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=n, max_size=n)), type=pa.int64())
    if kind == "float":
        return pa.array(draw(st.lists(st.floats(allow_nan=True), min_size=n, max_size=n)), type=pa.float64())
    if kind == "bool":
        return pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), type=pa.bool_())
    if kind == "list":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.lists(opt_text, max_size=3)), min_size=n, max_size=n)),
                        type=pa.list_(pa.string()))
    raise AssertionError(kind)


@st.composite
def pair_tables(draw) -> pa.Table:
    n = draw(st.integers(0, 5))
    names = draw(st.lists(st.sampled_from([c.name for c in PAIRS] + ["extra"]), unique=True, max_size=7))
    cols = {name: _column(draw(st.sampled_from(["string", "int", "float", "bool", "list"])), n, draw)
            for name in names}
    return pa.table(cols) if cols else pa.table({"x": pa.array([], pa.int64())})


@SETTINGS
@given(table=pair_tables())
def test_any_pairs_table_is_accepted_only_when_valid(table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pairs.parquet"
        p.write_bytes(buf.getvalue())
        try:
            got = check_pairs(p)
        except SchemaError as e:
            assert str(p) in str(e)
            return
    # accepted: every required column is there, non-null, and its texts are non-empty
    assert got.num_rows > 0
    for c in PAIRS:
        if c.required:
            vals = got.column(c.name).to_pylist()
            assert None not in vals
            if c.kind == "string":
                assert all(isinstance(v, str) and v for v in vals)


@SETTINGS
@given(data=st.binary(max_size=400), cut=st.floats(0, 1))
def test_garbage_or_truncated_parquet_is_a_schema_error(data, cut):
    good = io.BytesIO()
    pq.write_table(pa.table({"query": ["q"], "positive": ["p"], "query_id": ["1"], "positive_id": ["2"]}), good)
    whole = good.getvalue()
    assume(data != whole)
    with tempfile.TemporaryDirectory() as d:
        for i, blob in enumerate([data, whole[: int(len(whole) * cut)]]):
            if blob == whole:
                continue
            p = Path(d) / f"f{i}.parquet"
            p.write_bytes(blob)
            with pytest.raises(SchemaError, match="not a readable Parquet file|missing column"):
                check_pairs(p)
