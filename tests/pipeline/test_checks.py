"""The shared validators (pipeline.checks): what passes, what fails, and that the error names the field."""

import pytest

from pipeline.checks import positive_int


def test_positive_int_accepts_ints_at_or_above_the_bound():
    assert positive_int("n", 3) == 3 and positive_int("n", 1) == 1 and positive_int("n", 0, low=0) == 0


@pytest.mark.parametrize(
    "value,low,message",
    [
        (0, 1, "^n must be a positive int, got 0$"),
        (True, 1, "^n must be a positive int, got True$"),  # a bool is an int to Python, never a count
        (2.0, 1, "^n must be a positive int, got 2.0$"),
        ("3", 1, "^n must be a positive int, got '3'$"),
        (-1, 0, "^n must be an int >= 0, got -1$"),
        (False, 0, "^n must be an int >= 0, got False$"),
    ],
)
def test_positive_int_rejects_with_the_field_name(value, low, message):
    with pytest.raises(ValueError, match=message):
        positive_int("n", value, low=low)
