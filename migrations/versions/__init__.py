"""Alembic revisions; a package only so that an installed sandboxd carries them."""
