"""Replays the committed fuzz corpus (tests/fuzz/corpus) through the
libFuzzer harnesses built with ASan and UBSan: every input that ever found
a problem, and the seeds, must run clean.  The long fuzzing runs are
`make fuzz` (FUZZ_SECONDS per target)."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_fuzz_corpus_replays_clean():
    for target in ("codec", "json"):
        assert len(os.listdir(REPO / "tests" / "fuzz" / "corpus" / target)) >= 5
    proc = subprocess.run(["bash", "tests/fuzz/run.sh", "--replay"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "replaying" in proc.stdout
