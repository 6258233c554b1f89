"""TUNECOMP_TEST_SHARD (tests/conftest.py): n processes run the suite between them."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def collected(shard=None, target="test_schedule.py"):
    env = dict(os.environ)
    env.pop("TUNECOMP_TEST_SHARD", None)
    if shard:
        env["TUNECOMP_TEST_SHARD"] = shard
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                             os.path.join(HERE, target)], capture_output=True, text=True, env=env, cwd=HERE)
    return result.returncode, [line for line in result.stdout.splitlines() if "::" in line], result.stderr


def test_shards_partition_the_suite():
    rc, everything, _ = collected()
    assert rc == 0 and len(everything) >= 3
    shards = [collected(f"{i}/3")[1] for i in range(3)]
    assert all(shards) and sorted(sum(shards, [])) == sorted(everything)  # each test in one shard
    assert collected("3/3")[0] != 0 and "must be i/n with 0 <= i < n; got '3/3'" in collected("3/3")[2]
