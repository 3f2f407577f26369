"""docs/recipes.md's arq recipe, executed from the page, in an app around it:
imported by the test (the web side, which sets ``redis``, the pool) and by the
worker (``arq tests.recipe_arq.WorkerSettings``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

import fastapi_rwdb
from tests.recipe_models import Confirmation, Order, OrderIn
from tests.recipes import REDIS, recipe

__all__ = ["Confirmation", "Order", "OrderIn", "app"]

REDIS_URL = f"{REDIS}/3"
app = FastAPI()
fastapi_rwdb.setup(app)
redis: Any = None  # the test opens the pool (the recipe: at the app's start-up)

exec(compile(recipe("# arq"), "docs/recipes.md (# arq)", "exec"))  # noqa: S102
