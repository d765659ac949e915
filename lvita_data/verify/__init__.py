"""`lvita verify`: structural, per-sample and accounting checks of a finished build."""

from lvita_data.verify.sample import (
    Problem,
    VerifyReport,
    check_sample,
    load_settings,
    verify_build,
    verify_shard,
)

__all__ = ["Problem", "VerifyReport", "check_sample", "load_settings", "verify_build", "verify_shard"]
