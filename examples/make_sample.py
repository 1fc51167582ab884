#!/usr/bin/env python3
"""Write examples/backups/sample.sql.gz: a small, deterministic "production" backup for the demo.

The data is invented by this script (a tiny shop: customers, products, orders,
order lines), in the shape ``pg_dump --format=plain`` produces: a schema,
``COPY ... FROM stdin`` blocks, then indexes and constraints. Running it again
writes the same bytes (fixed seed, gzip header without a timestamp), so the
committed file can be checked against its generator:

    python examples/make_sample.py            # (re)write the backup
    python examples/make_sample.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import io
import pathlib
import random
import sys

SEED = 20240112
CUSTOMERS = 20_000
PRODUCTS = 2_000
ORDERS = 80_000
MAX_LINES_PER_ORDER = 5

OUT = pathlib.Path(__file__).resolve().parent / "backups" / "sample.sql.gz"

_FIRST = "Anna Boris Clara Dmitri Elena Fyodor Galina Igor Irina Kirill Lena Maxim Nina Oleg Pavel"
_LAST = "Ivanova Petrov Sidorova Smirnov Kuznetsova Popov Volkova Sokolov Lebedeva Kozlov Novikova"
_CITIES = "Moscow Kazan Samara Omsk Perm Tver Sochi Tomsk Vologda Pskov Kaluga Tula Ryazan"
_ADJ = "red blue quiet heavy small bright old smart round sharp soft warm strong light cold"
_NOUN = "kettle lamp chair cable router mug notebook pillow bottle charger blanket shovel clock"
_STATUS = ("new", "paid", "shipped", "delivered", "cancelled")

SCHEMA = """\
SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

CREATE TABLE public.customers (
    id integer NOT NULL,
    name text NOT NULL,
    email text NOT NULL,
    city text NOT NULL,
    created_at timestamp with time zone NOT NULL
);

CREATE TABLE public.products (
    id integer NOT NULL,
    title text NOT NULL,
    price_cents integer NOT NULL,
    stock integer NOT NULL
);

CREATE TABLE public.orders (
    id integer NOT NULL,
    customer_id integer NOT NULL,
    status text NOT NULL,
    ordered_at timestamp with time zone NOT NULL
);

CREATE TABLE public.order_lines (
    order_id integer NOT NULL,
    line integer NOT NULL,
    product_id integer NOT NULL,
    quantity integer NOT NULL,
    price_cents integer NOT NULL
);

"""

CONSTRAINTS = """\
ALTER TABLE ONLY public.customers ADD CONSTRAINT customers_pkey PRIMARY KEY (id);
ALTER TABLE ONLY public.products ADD CONSTRAINT products_pkey PRIMARY KEY (id);
ALTER TABLE ONLY public.orders ADD CONSTRAINT orders_pkey PRIMARY KEY (id);
ALTER TABLE ONLY public.order_lines ADD CONSTRAINT order_lines_pkey PRIMARY KEY (order_id, line);
CREATE UNIQUE INDEX customers_email_key ON public.customers USING btree (email);
CREATE INDEX orders_customer_id_idx ON public.orders USING btree (customer_id);
ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES public.customers(id);
ALTER TABLE ONLY public.order_lines
    ADD CONSTRAINT order_lines_order_id_fkey FOREIGN KEY (order_id) REFERENCES public.orders(id);
ALTER TABLE ONLY public.order_lines
    ADD CONSTRAINT order_lines_product_id_fkey FOREIGN KEY (product_id) REFERENCES public.products(id);
ANALYZE;
"""


def render() -> bytes:
    """The whole SQL script, deterministic for a given SEED."""
    rng = random.Random(SEED)  # noqa: S311 - invented data, not secrets
    first, last, cities = _FIRST.split(), _LAST.split(), _CITIES.split()
    adjectives, nouns = _ADJ.split(), _NOUN.split()
    epoch = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)
    out = io.StringIO()
    out.write(
        "--\n-- aldaas sample backup, written by examples/make_sample.py (invented data)\n--\n\n"
    )
    out.write(SCHEMA)

    out.write("COPY public.customers (id, name, email, city, created_at) FROM stdin;\n")
    for i in range(1, CUSTOMERS + 1):
        name = f"{rng.choice(first)} {rng.choice(last)}"
        email = f"{name.lower().replace(' ', '.')}.{i}@example.com"
        created = epoch + datetime.timedelta(seconds=rng.randrange(365 * 86400))
        out.write(f"{i}\t{name}\t{email}\t{rng.choice(cities)}\t{created.isoformat()}\n")
    out.write("\\.\n\n")

    prices = {}
    out.write("COPY public.products (id, title, price_cents, stock) FROM stdin;\n")
    for i in range(1, PRODUCTS + 1):
        prices[i] = rng.randrange(99, 99_999)
        title = f"{rng.choice(adjectives)} {rng.choice(nouns)} model {rng.randrange(100, 999)}"
        out.write(f"{i}\t{title}\t{prices[i]}\t{rng.randrange(0, 500)}\n")
    out.write("\\.\n\n")

    lines = io.StringIO()
    out.write("COPY public.orders (id, customer_id, status, ordered_at) FROM stdin;\n")
    for i in range(1, ORDERS + 1):
        at = epoch + datetime.timedelta(seconds=rng.randrange(2 * 365 * 86400))
        status = rng.choice(_STATUS)
        out.write(f"{i}\t{rng.randrange(1, CUSTOMERS + 1)}\t{status}\t{at.isoformat()}\n")
        for line in range(1, rng.randrange(1, MAX_LINES_PER_ORDER + 1) + 1):
            product = rng.randrange(1, PRODUCTS + 1)
            lines.write(f"{i}\t{line}\t{product}\t{rng.randrange(1, 4)}\t{prices[product]}\n")
    out.write("\\.\n\n")

    out.write(
        "COPY public.order_lines (order_id, line, product_id, quantity, price_cents) FROM stdin;\n"
    )
    out.write(lines.getvalue())
    out.write("\\.\n\n")
    out.write(CONSTRAINTS)
    return out.getvalue().encode()


def compressed() -> bytes:
    """gzip with mtime 0 and no file name, so the bytes depend on the data alone."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(render())
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args()
    data = compressed()
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == data
        print(f"{args.out}: {'up to date' if same else 'differs from its generator'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB compressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
