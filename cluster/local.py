"""Getting a Ray to run on: the embedded local default, or an existing cluster by address."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Start (or attach to) Ray once per process, with the console filter of ``console`` (Ray's
    chatter to the log file set by ``console.log_to``; ``NEGATRON_VERBOSE=1`` shows it all).

    With no address, an embedded local Ray is started in-process (``address="local"``), so a
    cluster someone else runs on this machine is never joined by accident. ``address`` (or
    RAY_ADDRESS set by ``ray job submit``) attaches to an existing cluster.
    """
    import ray

    from . import console

    if ray.is_initialized():
        return
    console.before_ray_init()
    address = address or os.environ.get("NEGATRON_RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        console.after_ray_init()
        return
    if os.environ.get("RAY_ADDRESS"):  # inside a Ray job: the job's cluster and runtime env
        ray.init(log_to_driver=True)
        console.after_ray_init()
        return
    # Ray CPUs are logical: twice the cores (at least 4) lets trial drivers, fractional workers
    # and Ray Data share a small machine without starving each other.
    cpus = num_cpus if num_cpus is not None else max(4, 2 * (os.cpu_count() or 2))
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls: without
    # it, a trial stopped by ASHA leaks its workers' placement group until the driver exits.
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, runtime_env=env, log_to_driver=True,
             logging_level="INFO")  # the terminal shows errors only unless verbose (console.before_ray_init)
    console.after_ray_init()
