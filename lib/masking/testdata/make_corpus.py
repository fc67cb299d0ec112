#!/usr/bin/env python3
"""Writes corpus.tsv: labelled values for the masking detectors.

Each line is `label<TAB>value`; the label is the detector that must mask the
value, or `none` for a look-alike that must be left alone. Values are made
here with their checksums computed independently of the Rust code (seeded, so
the file is reproducible): payment cards of every major issuer range with a
Luhn check digit, IBANs of many countries with ISO 7064 check digits, US SSNs,
e-mails, phones, addresses, tokens and keys; and their near misses.
"""
import random
import string

rng = random.Random(20261129)
rows = []


def luhn_digit(body):
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def card(prefix, length):
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def group(n, size=4, sep=" "):
    return sep.join(n[i:i + size] for i in range(0, len(n), size))


issuers = [("4", 16), ("4", 13), ("4", 19), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16),
           ("34", 15), ("37", 15), ("6011", 16), ("644", 16), ("65", 16), ("3528", 16),
           ("3589", 19), ("300", 14), ("36", 14), ("62", 16), ("62", 19)]
for i in range(220):
    prefix, length = issuers[i % len(issuers)]
    n = card(prefix, length)
    style = i % 3
    v = n if style == 0 else group(n, sep=" " if style == 1 else "-")
    rows.append(("card", v))
# Near misses: 16 digits that fail Luhn (every one checked), and Luhn-valid
# numbers outside any issuer range.
for i in range(80):
    n = card("4", 16)
    bad = n[:-1] + str((int(n[-1]) + 1 + rng.randrange(9)) % 10)
    rows.append(("none", bad if i % 2 else group(bad)))
for i in range(20):
    rows.append(("none", card("9", 16)))

iban_lengths = {"DE": 22, "GB": 22, "FR": 27, "ES": 24, "IT": 27, "NL": 18, "BE": 16, "CH": 21,
                "AT": 20, "SE": 24, "NO": 15, "DK": 18, "FI": 18, "PL": 28, "PT": 25, "IE": 22}


def iban_check(country, bban):
    s = bban + country + "00"
    num = "".join(str(int(c, 36)) for c in s)
    return "%02d" % (98 - int(num) % 97)


def bban(country, length):
    n = length - 4
    if country in ("GB", "IE", "NL"):
        letters = 4
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(letters)) + \
            "".join(rng.choice(string.digits) for _ in range(n - letters))
    return "".join(rng.choice(string.digits) for _ in range(n))


countries = sorted(iban_lengths)
for i in range(110):
    c = countries[i % len(countries)]
    b = bban(c, iban_lengths[c])
    iban = c + iban_check(c, b) + b
    rows.append(("iban", group(iban) if i % 2 else iban))
for i in range(30):
    c = countries[i % len(countries)]
    b = bban(c, iban_lengths[c])
    good = iban_check(c, b)
    wrong = "%02d" % ((int(good) + 1 + rng.randrange(90)) % 97 or 2)
    if wrong == good:
        wrong = "%02d" % ((int(good) + 1) % 97)
    rows.append(("none", c + wrong + b))

for i in range(40):
    area = rng.choice([a for a in range(1, 900) if a != 666])
    rows.append(("us_ssn", "%03d-%02d-%04d" % (area, rng.randrange(1, 100), rng.randrange(1, 10000))))
for v in ["000-12-3456", "666-12-3456", "900-12-3456", "999-99-9999", "123-00-4567", "123-45-0000"]:
    rows.append(("none", v))

names = ["ada", "bob.smith", "c.d+tag", "zoe_99", "j-doe", "mary.o.connor"]
domains = ["example.com", "mail.example.org", "corp.example.co.uk", "example.io"]
for i in range(40):
    rows.append(("email", "%s%d@%s" % (names[i % len(names)], i, domains[i % len(domains)])))
for v in ["user@localhost", "not an email", "@example.com", "a@b", "name at example.com"]:
    rows.append(("none", v))

for i in range(30):
    if i % 3 == 0:
        v = "+%d %d %04d %04d" % (rng.choice([44, 49, 33, 61]), rng.randrange(10, 99),
                                  rng.randrange(10000), rng.randrange(10000))
    elif i % 3 == 1:
        v = "(%03d) %03d-%04d" % (rng.randrange(200, 999), rng.randrange(200, 999), rng.randrange(10000))
    else:
        v = "%03d-%03d-%04d" % (rng.randrange(200, 999), rng.randrange(200, 999), rng.randrange(10000))
    rows.append(("phone", v))
for v in ["2024-01-15", "12:30:45", "v1.2.3", "1-2-3"]:
    rows.append(("none", v))

for i in range(25):
    rows.append(("ipv4", ".".join(str(rng.randrange(256)) for _ in range(4))))
for v in ["256.1.1.1", "1.2.3", "999.999.999.999"]:
    rows.append(("none", v))
for i in range(15):
    groups = ["%x" % rng.randrange(65536) for _ in range(8)]
    rows.append(("ipv6", ":".join(groups) if i % 2 else "2001:db8::%x" % rng.randrange(1, 65536)))
for v in ["::", "cafe::beef", "00:1A:2B:3C:4D:5E"]:
    rows.append(("none", v))

b64 = string.ascii_letters + string.digits + "-_"
for i in range(10):
    rows.append(("jwt", "eyJ" + "".join(rng.choice(b64) for _ in range(20)) + ".eyJ" +
                 "".join(rng.choice(b64) for _ in range(40)) + "." + "".join(rng.choice(b64) for _ in range(43))))
alnum = string.ascii_letters + string.digits
for i in range(12):
    kind = i % 4
    if kind == 0:
        v = "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    elif kind == 1:
        v = "ghp_" + "".join(rng.choice(alnum) for _ in range(36))
    elif kind == 2:
        v = "sk_live_" + "".join(rng.choice(alnum) for _ in range(24))
    else:
        v = "xoxb-" + "".join(rng.choice(string.digits) for _ in range(12)) + "-" + \
            "".join(rng.choice(alnum) for _ in range(24))
    rows.append(("secret", v))
for v in ["plain words only", "SELECT 1", "order #12345", "42", "3.14159", "true", "Mississippi"]:
    rows.append(("none", v))

with open("corpus.tsv", "w") as f:
    f.write("# label<TAB>value; made by make_corpus.py (seeded). `none` must not be masked.\n")
    for label, value in rows:
        f.write("%s\t%s\n" % (label, value))
print(len(rows), "values")
