"""Print mutmut's result for the pure core: the score and every mutant that lived (issue #24).

Run by ``.ci/mutate`` inside the scratch copy, after ``mutmut run``. A mutant counts as
killed when a test failed, timed out or it broke the import; "no tests" (no selected test
calls the function) counts against the score like a survivor, since nothing would notice.
Each survivor is printed with its diff, so the scheduled job's log is enough to act on;
the known equivalent ones are named in .ci/mutants.md.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
MUTMUT = str(Path(sys.executable).parent / "mutmut")


def _function(key: str) -> str:
    """'zoo_agent.plan.xǁStepǁdescribe__mutmut_10' -> 'zoo_agent.plan:Step.describe'."""
    m = re.match(r"(.+?)\.x(?:_|ǁ)(.+)__mutmut_\d+$", key)
    return f"{m.group(1)}:{m.group(2).replace('ǁ', '.')}" if m else key


def main() -> int:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    status = dict(re.findall(r"^\s+(\S+): (.+)$", out, re.M))
    if not status:
        print("mutmut recorded no mutants: nothing was checked", file=sys.stderr)
        return 1
    counts = collections.Counter(status.values())
    killed = sum(n for s, n in counts.items() if s in KILLED)
    lived = sorted(k for k, s in status.items() if s not in KILLED)
    per_function = collections.Counter(_function(k) for k in lived)
    per_module = collections.Counter(_function(k).split(":")[0] for k in status)
    lived_module = collections.Counter(_function(k).split(":")[0] for k in lived)
    print(f"\n==> mutation score of the pure core: {killed}/{len(status)} killed ({100 * killed / len(status):.1f}%)")
    print("    " + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())))
    for module, n in sorted(per_module.items()):
        print(f"    {module:32} {n - lived_module[module]:5}/{n:<5} killed")
    print("\n==> not killed, by function (no tests: no selected test calls it)")
    for function, n in sorted(per_function.items()):
        kinds = collections.Counter(status[k] for k in lived if _function(k) == function)
        print(f"    {function:60} {n:4}  " + ", ".join(f"{s} {c}" for s, c in sorted(kinds.items())))
    if os.environ.get("MUTATE_DIFFS", "1") != "0":
        for key in lived:
            if status[key] == "survived":  # a "no tests" function is named above; its diffs say nothing more
                diff = subprocess.run([MUTMUT, "show", key], capture_output=True, text=True).stdout
                print(f"\n--- {key}: {status[key]}\n{diff.rstrip()}")
    return 0 if not lived else 1


if __name__ == "__main__":
    sys.exit(main())
