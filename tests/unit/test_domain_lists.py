"""Plain-text lists are split into lines a chunk at a time (a big list must not hold the
interpreter in one long call): the lines, and so every problem's line number, stay the same."""
from hypothesis import given, settings, strategies as st

from resolver.loader import _split_lines


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n", max_size=60), size=st.integers(1, 70))
def test_lists_are_split_a_chunk_at_a_time_into_the_same_lines(text, size):
    assert list(_split_lines(text, size)) == text.split("\n")
