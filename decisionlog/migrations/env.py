"""Alembic's environment for the decision log: always run from
:func:`decisionlog.database.migrate`, which passes an open connection (holding the migration
lock) in ``config.attributes["connection"]``."""

from alembic import context

from decisionlog.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
