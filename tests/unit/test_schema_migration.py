"""An older database gains the nullable columns a newer gridtune declares (no migration tool)."""

from sqlalchemy import create_engine, inspect, text

from models import dispose_engines, get_engine


def test_missing_nullable_column_is_added(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    get_engine(url)
    dispose_engines()
    old = create_engine(url)
    with old.begin() as conn:
        conn.execute(text("ALTER TABLE sweeps DROP COLUMN stop_reason"))
    assert "stop_reason" not in {c["name"] for c in inspect(old).get_columns("sweeps")}
    old.dispose()

    get_engine(url)
    again = create_engine(url)
    assert "stop_reason" in {c["name"] for c in inspect(again).get_columns("sweeps")}
    again.dispose()
    dispose_engines()
