"""Connecting a job to Ray the way `ray.init()` users expect, and keeping Ray's chatter off the
console unless asked for.

A job joins the cluster it was submitted to (`ray job submit` sets RAY_ADDRESS) or one started on
this machine with `ray start`; only when there is none does it start a local Ray, sized by the
config's `ray.num_cpus`.
"""

from __future__ import annotations

import logging

from pipelines.job_config import RaySection


def connect(section: RaySection) -> str:
    """Returns "existing" or "local" (what was joined)."""
    import ray
    from ray.data import DataContext

    quiet = not section.verbose
    DataContext.get_current().enable_progress_bars = section.verbose
    if quiet:
        # Ray Data logs every operator's progress and Ray Train every worker's report; both still
        # go to the session's log files (/tmp/ray/session_latest/logs).
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Its one warning says that the progress bars are off, which is what quiet means here.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if ray.is_initialized():
        return "existing"
    common = {"log_to_driver": section.verbose, "logging_level": logging.INFO if section.verbose else logging.WARNING}
    try:
        ray.init(address="auto", **common)
        return "existing"
    except ConnectionError:
        pass
    ray.init(num_cpus=section.num_cpus, include_dashboard=False, **common)
    return "local"
