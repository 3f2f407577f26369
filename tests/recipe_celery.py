"""docs/recipes.md's Celery recipe, executed from the page, in an app and a Celery
application around it: imported by the test (the web side) and by the worker
(``celery -A tests.recipe_celery:celery_app worker``)."""

from __future__ import annotations

from celery import Celery
from fastapi import FastAPI

import fastapi_rwdb
from tests.recipe_models import Confirmation, Order, OrderIn
from tests.recipes import REDIS, recipe

__all__ = ["Confirmation", "Order", "OrderIn", "app", "celery_app"]

app = FastAPI()
fastapi_rwdb.setup(app)
celery_app = Celery("recipes", broker=f"{REDIS}/1", backend=f"{REDIS}/2")
celery_app.conf.broker_connection_retry_on_startup = True

exec(compile(recipe("# Celery"), "docs/recipes.md (# Celery)", "exec"))  # noqa: S102
