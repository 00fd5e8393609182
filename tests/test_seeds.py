"""Every complete Python example of the client documentation (seeds 000, 001, 002)
runs unchanged against Tollgate, with only the URL, key and team substituted,
and prints what the documentation says it prints."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO

SEEDS = Path(__file__).parent / "seeds"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def fenced(seed: str, index: int) -> str:
    return re.findall(r"```python\n(.*?)```", (SEEDS / seed).read_text(), re.S)[index]


def between(seed: str, start: str, end: str) -> str:
    text = (SEEDS / seed).read_text()
    first = text.index(start)
    return text[first : text.index(end, first) + len(end)] + "\n"


EXAMPLES = {
    "000-complete-workflow": (
        lambda: fenced("000_ab710b393b3a6898.txt", 0),
        [rf"^Created job: {UUID}$", r"^Response: \S", r"^Job completed\. Credits remaining: \d+$"],
    ),
    "000-document-analysis": (
        lambda: fenced("000_ab710b393b3a6898.txt", 13),
        [r"^Summary: \S", r"^Key Points:$", r"^Credits remaining: \d+$"],
    ),
    "001-typed-client-streaming": (
        lambda: between(
            "001_b48cee1fcce71b2e.txt",
            "from examples.typed_client import SaaSLLMClient\n\nasync def streaming_example",
            "asyncio.run(streaming_example())",
        ),
        [r"^Full response: word1 word2", r"^Credits remaining: \d+$"],
    ),
    "001-multi-step-job": (
        lambda: between(
            "001_b48cee1fcce71b2e.txt",
            'import requests\n\nAPI_URL = "http://localhost:8003/api"\nVIRTUAL_KEY = "sk-your-virtual-key"\n\nheaders = {\n    "Authorization": f"Bearer {VIRTUAL_KEY}",\n    "Content-Type": "application/json"\n}\n\n# 1. Create job',
            "print(f\"Credits remaining: {result['costs']['credits_remaining']}\")",
        ),
        [
            rf"^Created job: {UUID}$",
            r"^Parse document: word1",
            r"^  Tokens: \d+$",
            r"^Job completed!$",
            r"^Total calls: 3$",
            r"^Total tokens: \d+$",
            r"^Total cost: \$0\.\d{4}$",
            r"^Credit deducted: True$",
            r"^Credits remaining: \d+$",
        ],
    ),
    "002-simple-call": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 0),
        [r"^Creating job\.\.\.$", rf"^Created job: {UUID}$", r"^Response:$", r"^Credits remaining: \d+$"],
    ),
    "002-conversation": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 1),
        [r"^User: What is FastAPI\?$", r"^Assistant: word1", r"^Conversation complete\. Credits remaining: \d+$"],
    ),
    "002-document-analysis": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 2),
        [rf"^Analyzing document \(Job ID: {UUID}\)\.\.\.$", r"^Analysis complete!$", r"^Total calls: 2$"],
    ),
    "002-error-handling": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 3),
        [r"^Response: word1"],
    ),
    "002-typed-client": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 4),
        [rf"^Created job: {UUID}$", r"^word1 word2", r"^Credits remaining: \d+$"],
    ),
    "002-batch": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 5),
        [r"^Classifying text 3/3\.\.\.$", r"^Processed 3 texts$", r"^  'This product is amazing! I love it\.' → word1"],
    ),
    "002-check-credits": (
        lambda: fenced("002_12633b3aee9fecf4.txt", 6),
        [r"^Team: seed-", r"^Status: active$", r"^Credits allocated: 100$", r"^Credits used: \d+$", r"^Usage: \d+\.\d%$"],
    ),
}


def substitute(code: str, url: str, key: str, team_id: str) -> str:
    code = code.replace("http://localhost:8003", url)
    code = re.sub(r"sk-your-virtual-key(-here)?", key, code)
    return code.replace('"acme-corp"', f'"{team_id}"')


@pytest.mark.parametrize("name", EXAMPLES)
def test_documented_example_runs_unchanged(name, tollgate, admin):
    source, expected = EXAMPLES[name]
    team = admin.team(credits=100, groups=("ChatAgent", "AnalysisAgent"), team_id=f"seed-{os.urandom(4).hex()}")
    code = substitute(source(), tollgate.url, team.key, team.team_id)
    env = {**os.environ, "SAAS_LITELLM_VIRTUAL_KEY": team.key, "SAAS_LITELLM_TEAM_ID": team.team_id, "PYTHONPATH": str(REPO)}
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for pattern in expected:
        assert re.search(pattern, result.stdout, re.M), f"{pattern!r} not in:\n{result.stdout}"
    after = admin.get_team(team.team_id)
    assert after["credits_held"] == 0, "every job the example opened was completed"
    assert after["credits_used"] <= 3
