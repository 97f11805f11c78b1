"""The sequencer orders work on overlapping ranges and nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mirrorpool.mirror.sequencer import Sequencer, _overlaps


def test_work_on_several_ranges_waits_only_for_what_overlaps_one_of_them() -> None:
    seq = Sequencer()
    inside = seq.admit(100, 110)
    between = seq.admit(20, 30)
    copy = seq.admit_parts([(0, 10), (50, 60), (100, 200)], "copy")
    assert copy.deps == [inside]
    assert between not in copy.deps
    later_between = seq.admit(10, 50)  # between the parts: free to run
    later_on = seq.admit(55, 56)
    assert copy not in later_between.deps
    assert copy in later_on.deps


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), min_size=1, max_size=8),
       st.integers(0, 600), st.integers(1, 50))
def test_overlap_of_parts_matches_a_plain_scan(gaps, start, length) -> None:  # type: ignore[no-untyped-def]
    parts, pos = [], 0
    for gap, size in gaps:
        parts.append((pos + gap, pos + gap + size))
        pos += gap + size
    end = start + length
    assert _overlaps(parts, start, end) == any(s < end and start < e for s, e in parts)
