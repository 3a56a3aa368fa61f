"""The one reader of patch headers (patching.check_format): every tool that lists a
patch's files (build, drift guard, plugin, upstream-status) refuses a deleted, renamed
or copied file through it, in the same words."""

from __future__ import annotations

import pytest
from overlaytools import patching
from overlaytools.errors import OverlayError

pytestmark = pytest.mark.fast

TARGET = "vllm/model_executor/models/qwen3_moe.py"
OTHER = "vllm/model_executor/models/qwen3_moe_copy.py"
MESSAGE = "Subject: [PATCH] a test\n\nOrigin: backport, https://example.invalid/1\n---\n"
HUNK = "@@ -1 +1 @@\n-a\n+b\n"
SECTIONS = {
    "deletes": (
        f"diff --git a/{TARGET} b/{TARGET}\ndeleted file mode 100644\nindex 1111111..0000000\n"
        f"--- a/{TARGET}\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n",
        f"deletes {TARGET}",
    ),
    "renames": (
        f"diff --git a/{TARGET} b/{OTHER}\nsimilarity index 100%\nrename from {TARGET}\nrename to {OTHER}\n",
        f"renames {TARGET} to {OTHER}",
    ),
    "copies": (
        f"diff --git a/{TARGET} b/{TARGET}\ncopy from {TARGET}\ncopy to {TARGET}\n",
        f"copies {TARGET}",
    ),
}


@pytest.mark.parametrize("case", SECTIONS)
@pytest.mark.parametrize("reader", [patching.check_format, lambda p: patching.touched_files([p])])
def test_deletes_renames_and_copies_are_refused_in_one_text(tmp_path, case, reader):
    section, what = SECTIONS[case]
    patch = tmp_path / "0001-test.patch"
    patch.write_text(MESSAGE + section)
    with pytest.raises(OverlayError) as refused:
        reader(patch)
    assert str(refused.value) == f"0001-test.patch {what}: {patching.ONLY_CHANGE_OR_ADD}"


def test_headers_name_each_file_and_mark_added_ones(tmp_path):
    patch = tmp_path / "0001-test.patch"
    patch.write_text(
        MESSAGE
        + f"diff --git a/{TARGET} b/{TARGET}\nindex 1111111..2222222 100644\n--- a/{TARGET}\n+++ b/{TARGET}\n"
        + HUNK
        + f"diff --git a/{OTHER} b/{OTHER}\nnew file mode 100644\nindex 0000000..3333333\n--- /dev/null\n"
        + f"+++ b/{OTHER}\n@@ -0,0 +1 @@\n+b\n"
    )
    assert list(patching.check_format(patch)) == [TARGET, OTHER]
    assert patching.touched_files([patch]) == [TARGET, OTHER]
    assert patching.added_files([patch]) == [OTHER]
