"""Celery's gevent pool without a reference cycle per task (what ``-P gevent`` runs here).

Celery's gevent pool (5.7.0 here, since celery/celery#9440) gives every task's greenlet a
``terminate`` attribute bound to that greenlet (``greenlet.terminate = types.MethodType(_terminate,
greenlet)``, for ``revoke(terminate=True)``). The greenlet then refers to itself: once the task ends, refcounting
cannot free it, nor anything it still holds (its frames' locals, Context, greenlet-local dicts,
the task's arguments). Only the cyclic collector's full collections do, which a worker full of
long-lived objects runs rarely: in issue 13's soak at C = 1,000 (about 40 tasks per second per
process) each worker's full collections, every ~10 s, found ~12,800 such objects each time and
held the hub for up to 184 ms, and the soak's RSS rose with the garbage's highest peaks
(docs/BENCHMARKS.md).

:class:`TaskPool` keeps Celery's behaviour and binds ``terminate`` through a weak reference.
gevent's greenlet-tree tracking (a captured spawning stack of ~10 frames and a tree-locals dict on
every spawn, for debugging) is turned off in the worker unless ``GEVENT_TRACK_GREENLET_TREE`` is
set. :func:`tars_tasks.celery_app.make_app` makes ``-P gevent`` (the CLI's name, which also
triggers Celery's early monkey-patching) resolve to this class.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from celery.concurrency import gevent as celery_gevent


def _weakly_bound(method: Any) -> Any:
    """``method`` (bound to a greenlet) as a callable that does not keep the greenlet alive."""
    func, ref = method.__func__, weakref.ref(method.__self__)

    def terminate(signal: Any = None) -> Any:
        greenlet = ref()
        return None if greenlet is None else func(greenlet, signal)

    return terminate


class TaskPool(celery_gevent.TaskPool):
    """Celery's gevent pool; a finished task's greenlet is freed by refcounting alone."""

    def on_start(self) -> None:
        if "GEVENT_TRACK_GREENLET_TREE" not in os.environ:
            import gevent

            gevent.config.track_greenlet_tree = False
        super().on_start()

    def on_apply(self, *args: Any, **kwargs: Any) -> Any:
        greenlet = super().on_apply(*args, **kwargs)
        terminate = getattr(greenlet, "terminate", None)
        if terminate is not None and getattr(terminate, "__self__", None) is greenlet:
            greenlet.terminate = _weakly_bound(terminate)
        return greenlet

