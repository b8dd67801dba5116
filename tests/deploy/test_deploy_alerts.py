"""The Prometheus alert rules are valid and fire when, and only when, they should
(promtool from Debian's prometheus package, installed by deploy/install_ci_tools.sh)."""

import re
import shutil
import subprocess

import pytest

from tests.support.monitoring import PROMETHEUS


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run deploy/install_ci_tools.sh"
    return subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    "alert",
    [
        "PagedserveHighTimeToFirstToken",
        "PagedserveKVCacheNearlyFull",
        "PagedserveQueueGrowing",
        "PagedserveWorkerDown",
        "PagedserveErrors",
    ],
)
def test_every_alert_is_unit_tested(alert: str) -> None:
    assert alert in (PROMETHEUS / "alerts.yml").read_text()
    tests = (PROMETHEUS / "alerts_test.yml").read_text()
    assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels", tests), (
        f"{alert} never fires in a test"
    )
