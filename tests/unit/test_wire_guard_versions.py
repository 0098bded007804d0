"""The message guards depend on Celery/kombu internals: they refuse versions they were not tested on."""

from __future__ import annotations

import celery
import kombu
import pytest

from workers.queue.wire_guard import UntestedVersionError, require_tested_versions


def test_the_installed_versions_are_in_the_tested_range():
    require_tested_versions({"celery": celery.__version__, "kombu": kombu.__version__})


@pytest.mark.parametrize("versions, package", [
    ({"celery": "5.8.0", "kombu": "5.7.0"}, "celery"),
    ({"celery": "5.6.3", "kombu": "5.7.0"}, "celery"),
    ({"celery": "6.0.0b1", "kombu": "5.7.0"}, "celery"),
    ({"celery": "5.7.0", "kombu": "5.8.1"}, "kombu"),
])
def test_an_untested_version_refuses_with_a_clear_error(versions, package):
    with pytest.raises(UntestedVersionError, match=rf"written for {package} >=5\.7,<5\.8 and found {package} "
                                                   rf"{versions[package]}"):
        require_tested_versions(versions)
