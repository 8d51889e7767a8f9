"""A small sample SQLite database and a next-day copy with a few changes, for `make demo`
when ../shared/data/gen_snapshot.py (the realistic generator) is not beside the checkout.

    python bench/sample_db.py DAY1 DAY2
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import sys


def main() -> None:
    day1, day2 = sys.argv[1], sys.argv[2]
    rng = random.Random(1)
    words = [
        "".join(rng.choices("etaoinshrdlucmfwypvbgkqjxz", k=rng.randint(2, 9))) for _ in range(3000)
    ]
    db = sqlite3.connect(day1)
    db.execute("create table messages (id integer primary key, author int, body text, blob blob)")
    db.execute("create index by_author on messages(author)")
    rows = (
        (
            i,
            rng.randrange(5000),
            " ".join(rng.choices(words, k=rng.randint(5, 60))),
            rng.randbytes(rng.choice([0, 0, 0, 2000])),
        )
        for i in range(120_000)
    )
    db.executemany("insert into messages values (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    shutil.copyfile(day1, day2)
    db = sqlite3.connect(day2)
    for i in rng.sample(range(120_000), 1200):
        db.execute("update messages set body = body || ' (edited)' where id = ?", (i,))
    db.commit()
    db.close()


if __name__ == "__main__":
    main()
