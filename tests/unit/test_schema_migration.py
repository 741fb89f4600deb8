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


def test_an_old_datasets_table_gains_the_report_column(tmp_path):
    # Datasets finalized before the dataset report existed keep working: their report reads None.
    from models import session_scope
    from models.schema import Dataset, Sweep

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = get_engine(url)
    with session_scope(engine) as session:
        sweep = Sweep(name="old", config={}, fingerprint="f", total_requests=1)
        session.add(sweep)
        session.flush()
        session.add(Dataset(sweep_id=sweep.id, train_path="t", train_examples=1, validation_examples=0,
                            train_tokens=1, validation_tokens=0, train_sha256="s", dropped={}, encoding="e"))
    dispose_engines()
    old = create_engine(url)
    with old.begin() as conn:
        conn.execute(text("ALTER TABLE datasets DROP COLUMN report"))
    old.dispose()

    engine = get_engine(url)
    assert "report" in {c["name"] for c in inspect(engine).get_columns("datasets")}
    with session_scope(engine) as session:
        assert session.query(Dataset).one().report is None
    dispose_engines()
