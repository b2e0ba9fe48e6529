"""status.py and metrics.py see the master through a narrow, read-only view."""
import types

import pytest

from zkprefork.master.status import MasterView


def test_the_view_shows_only_what_the_reports_read():
    master = types.SimpleNamespace(phase='running', selector='the loop', exit_status=0)
    view = MasterView(master)
    assert view.phase == 'running'
    master.phase = 'draining'
    assert view.phase == 'draining'  # live, not a copy
    for hidden in ('selector', 'exit_status', '_spawn'):
        with pytest.raises(AttributeError, match='shows no'):
            getattr(view, hidden)


def test_the_view_is_read_only():
    view = MasterView(types.SimpleNamespace(phase='running'))
    with pytest.raises(AttributeError, match='read-only'):
        view.phase = 'done'
