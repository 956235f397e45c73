"""The service as the operator's commands open it: its settings, its database, and the
embedded default's directory (migrated on first use)."""

# The imports of core.service are inside the functions: `unlearn` with only the base
# install (the client) imports this module to list every command; pydantic-settings,
# sqlalchemy and alembic come with the api extra.

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from core.service.settings import Settings


def load_settings() -> Settings:
    from core.service.settings import Settings

    return Settings()


def sessions(settings: Settings) -> sessionmaker:
    from core.service.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.db_url))


def prepare_embedded(settings: Settings) -> None:
    """The embedded default keeps its state in one directory and migrates itself."""
    from core.service.migrate import upgrade

    settings.unlearn_data_dir.mkdir(parents=True, exist_ok=True)
    if settings.database_url is None:
        upgrade(settings.db_url)
