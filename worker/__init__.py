"""gridtune's workers: `celery -A worker worker` finds the Celery app here.

The app is imported lazily so that light modules (worker.ratelimit, worker.tokens) load without
Celery's start-up cost.
"""


def __getattr__(name: str):
    if name in ("app", "celery"):
        from worker.app import app

        return app
    raise AttributeError(name)
