"""Where the deployed monitoring lives, and the metrics its alerts and dashboards query."""

import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"


def referenced_metrics() -> set[str]:
    """Every pagedserve metric the dashboards and alerts query."""
    texts = [(PROMETHEUS / "alerts.yml").read_text()]
    texts += [json.dumps(json.loads(path.read_text())) for path in DASHBOARDS.glob("*.json")]
    return {name for text in texts for name in re.findall(r"pagedserve:[a-z0-9_]+", text)}
