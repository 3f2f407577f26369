"""A small tracker API wired with fastapi_rwdb; served by `bash scripts/dev.sh demo`."""
