"""SQLAlchemy's dialect compliance suite (sqlalchemy.testing.suite) for the evd dialect, run the
way third-party dialects run it: SQLAlchemy's pytest plugin, setup.cfg's [sqla_testing] naming the
requirements class (requirements.py). scripts/sqlalchemy-suite starts evd and runs it."""
import pytest
from sqlalchemy.dialects import registry

registry.register("evd", "evd.dialect", "EvdDialect")
registry.register("sqlite.evd", "evd.dialect", "EvdDialect")
registry.register("evd.evd", "evd.dialect", "EvdDialect")

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402,F401,F403
