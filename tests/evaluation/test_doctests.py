import doctest

import pytest

from coordexp_rl.evaluation import matching, metrics, records, robustness


@pytest.mark.parametrize("module", [matching, metrics, records, robustness])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
