"""The README's FastAPI example, run as written (its namespace aside) on every backend."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import tasklocks

README = Path(__file__).resolve().parents[2] / "README.md"


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if "FastAPI(" in b]
    assert len(found) == 1, "the README has one FastAPI example"
    return str(found[0])


def test_the_fastapi_example_answers_409_naming_the_holder(
    db_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    code = example()
    assert 'namespace="web"' in code
    monkeypatch.setenv("TASKLOCKS_DB", db_url)
    module: dict[str, Any] = {"__name__": "readme_example"}
    exec(
        compile(code.replace('namespace="web"', f'namespace="{namespace}"'), "README", "exec"),
        module,
    )
    with (
        tasklocks.connect(db_url, namespace=namespace) as other,
        TestClient(module["app"]) as client,
    ):
        backup = other.acquire("app_task:blog", owner="backup:nightly", note="backup")
        refused = client.post("/apps/blog/update")
        assert refused.status_code == 409
        detail = refused.json()["detail"]
        assert detail["held_by"] == {"app_task:blog": "backup:nightly"}
        assert "backup:nightly" in detail["error"] and "app_task:blog" in detail["error"]
        assert other.waiting() == []  # the timed-out request left the queue
        backup.release()
        done = client.post("/apps/blog/update")
        assert done.status_code == 200 and done.json() == {"updated": "blog"}
        assert other.held() == []
