"""The task registry: one task per model kind, each building a model with the training interface."""

import pytest

from negatron.cluster.config import ConfigError, load_config
from negatron.trainers.tasks import TASKS, TrainingModel, task_for
from tests.helpers import write_pairs


def test_every_schema_kind_has_a_task_and_every_task_a_kind():
    from negatron.cluster.config import ModelConfig

    kinds = set(ModelConfig.model_fields["kind"].annotation.__args__)
    assert kinds == set(TASKS)
    assert all(TASKS[k].kind == k for k in kinds)


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_each_task_builds_a_model_with_the_training_interface(kind, tmp_path, tiny_model_dir):
    over = {"bi-encoder": [f"model.path={tiny_model_dir}"],
            "cross-encoder": [f"model.path={tiny_model_dir}", "bank.size=0"],
            "image": ["model.path=default", "model.image_size=8"]}[kind]
    cfg = load_config(None, [f"model.kind={kind}", "model.max_length=32", *over])
    task = task_for(cfg)
    model = task.build_model(cfg)
    assert isinstance(model, TrainingModel)
    parts = model.state_parts()
    assert "extra" in parts and set(parts["extra"]) == {"log_scale"}
    model.load_state_parts(lambda name: parts[name], tmp_path)  # round trip
    assert task.primary_metric in task.metrics


def test_text_tasks_refuse_what_they_cannot_train(tmp_path, tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "trainer.batch_size=64",
                             f"data.train={write_pairs(tmp_path / 'p.parquet', n=48)}"])
    with pytest.raises(ConfigError, match="exceeds the 48 pairs"):
        task_for(cfg).validate(cfg)
    with pytest.raises(ConfigError, match="data.train: not set"):
        task_for(cfg.replace({"data.train": None})).validate(cfg.replace({"data.train": None}))


def test_negatives_as_ids_need_their_corpus(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from negatron.serve.index import write_corpus
    from negatron.trainers.schema import SchemaError

    table = pq.read_table(write_pairs(tmp_path / "p.parquet", n=48))
    table = table.append_column("negative_ids", pa.array([[f"d{(i + 1) % 48}"] for i in range(48)]))
    pq.write_table(table, tmp_path / "ids.parquet")
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "trainer.batch_size=8", f"data.train={tmp_path / 'ids.parquet'}"])
    with pytest.raises(ConfigError, match="has negative_ids but no negatives texts; set data.negatives_corpus"):
        task_for(cfg).validate(cfg)
    task_for(cfg).validate(cfg.replace({"data.num_negatives": 0}))  # trained without them, on purpose
    with pytest.raises(SchemaError, match="missing.parquet: file not found"):
        task_for(cfg).validate(cfg.replace({"data.negatives_corpus": str(tmp_path / "missing.parquet")}))
    corpus = write_corpus(tmp_path / "c.parquet", [f"d{i}" for i in range(48)], [f"doc {i}" for i in range(48)])
    ok = cfg.replace({"data.negatives_corpus": str(corpus)})
    task_for(ok).validate(ok)
    batch = task_for(ok).stream(ok, 0, 1).batch(0)
    assert all(t.startswith("doc ") for t in batch["negatives"]) and batch["neg_valid"].all()
