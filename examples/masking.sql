-- A masking (transform) step: aldaas runs this after restoring a backup and before verifying it,
-- in one transaction, as the restore's superuser, in the database leases get. Nothing of the
-- original values reaches a developer's lease. Point `transform.sql_file` (Helm:
-- `transform.sql`) at a file like this one and adapt the tables and columns to your schema.
--
-- Deterministic fakes keep joins, uniqueness and lengths plausible: the same id always gets the
-- same fake address, and no fake can be a real person's.

UPDATE public.customers
SET email = 'customer' || id || '@example.invalid',
    phone = '+1-555-' || lpad((id % 10000)::text, 4, '0'),
    full_name = 'Customer ' || id;

-- Free text may hold anything personal: drop it rather than guess.
UPDATE public.customers SET notes = NULL WHERE notes IS NOT NULL;
