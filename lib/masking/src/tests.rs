use super::*;

fn masker() -> Masker {
    match Masker::new(&Config::default()) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

fn masked(m: &Masker, s: &str) -> (String, Counts) {
    let mut c = Counts::new();
    let out = m
        .mask(s.as_bytes(), &mut c)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|| s.to_string());
    (out, c)
}

#[test]
fn valid_values_are_masked_with_their_shape() {
    let m = masker();
    for (input, want, detector) in [
        ("jane.doe@example.com", "j***@example.com", "email"),
        ("4242424242424242", "************4242", "card"),
        ("4242-4242-4242-4242", "****-****-****-4242", "card"),
        ("4111 1111 1111 1111", "**** **** **** 1111", "card"),
        ("5555555555554444", "************4444", "card"),
        ("2223003122003222", "************3222", "card"),
        ("378282246310005", "***********0005", "card"),
        ("6011111111111117", "************1117", "card"),
        ("3530111333300000", "************0000", "card"),
        ("30569309025904", "**********5904", "card"),
        (
            "GB82 WEST 1234 5698 7654 32",
            "GB** **** **** **** **54 32",
            "iban",
        ),
        ("DE89370400440532013000", "DE****************3000", "iban"),
        (
            "FR1420041010050500013M02606",
            "FR*********************2606",
            "iban",
        ),
        ("123-45-6789", "***-**-6789", "us_ssn"),
        ("+44 20 7946 0958", "+** ** **** **58", "phone"),
        ("(415) 555-0100", "(***) ***-**00", "phone"),
        ("415-555-0100", "***-***-**00", "phone"),
        ("192.168.10.254", "***.***.**.***", "ipv4"),
        ("2001:db8::ff00:42:8329", "****:***::****:**:****", "ipv6"),
        ("fe80::1", "****::*", "ipv6"),
        (
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "eyJ***.***.***",
            "jwt",
        ),
        ("AKIAIOSFODNN7EXAMPLE", "AKIA********", "secret"),
        (
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "ghp_********",
            "secret",
        ),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_********", "secret"),
        ("xoxb-1234567890-abcdefghij", "xoxb********", "secret"),
        ("-----BEGIN RSA PRIVATE KEY-----", "-********", "secret"),
    ] {
        let (out, counts) = masked(&m, input);
        assert_eq!(out, want, "{input}");
        assert_eq!(counts.get(detector), Some(&1), "{input}: {counts:?}");
        // Masking is idempotent.
        let (again, c2) = masked(&m, &out);
        assert_eq!(again, out, "{input} masked twice");
        assert!(c2.is_empty(), "{input}: mask re-detected as {c2:?}");
    }
}

#[test]
fn look_alikes_are_left_alone() {
    let m = masker();
    for input in [
        "4242424242424241",            // fails Luhn
        "1234567812345678",            // no issuer, fails Luhn
        "9999999999999995",            // Luhn-valid, no issuer
        "4242-4242 4242-4242",         // mixed separators
        "GB83 WEST 1234 5698 7654 32", // wrong IBAN check digits
        "000-12-3456",                 // area 000
        "666-12-3456",                 // area 666
        "912-12-3456",                 // area 9xx
        "123-00-4567",                 // group 00
        "123-45-0000",                 // serial 0000
        "999.168.1.1",                 // octet over 255
        "12:30:45",                    // a time
        "SELECT 'x'::text",            // a cast
        "cafe::beef",                  // a word, not an address
        "2024-01-15",                  // a date
        "order 12345",                 // a short number
        "not-an-email@localhost",      // no top-level domain
        "00:1A:2B:3C:4D:5E",           // a MAC address
    ] {
        let (out, counts) = masked(&m, input);
        assert_eq!(out, input, "{input} was masked as {counts:?}");
    }
}

#[test]
fn values_inside_text_are_masked_and_counted_per_detector() {
    let m = masker();
    let (out, counts) = masked(
        &m,
        "Ada <ada@example.com> paid with 4242 4242 4242 4242 from 10.0.0.7; ssn 123-45-6789, backup bob@example.org",
    );
    assert_eq!(
        out,
        "Ada <a***@example.com> paid with **** **** **** 4242 from **.*.*.*; ssn ***-**-6789, backup b***@example.org"
    );
    assert_eq!(counts.get("email"), Some(&2));
    assert_eq!(counts.get("card"), Some(&1));
    assert_eq!(counts.get("ipv4"), Some(&1));
    assert_eq!(counts.get("us_ssn"), Some(&1));
    // Nothing to mask: no copy.
    assert!(
        m.mask(b"plain text, 42 apples", &mut Counts::new())
            .is_none()
    );
}

#[test]
fn custom_expressions_and_detector_selection() {
    let m = match Masker::new(&Config {
        detectors: vec![Detector::Email],
        custom: vec![("employee_id".into(), r"EMP-\d{6}".into())],
    }) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let (out, counts) = masked(&m, "EMP-123456 a@b.io 4242424242424242");
    assert_eq!(out, "***-****** a***@b.io 4242424242424242");
    assert_eq!(counts.get("employee_id"), Some(&1));
    assert_eq!(counts.get("email"), Some(&1));
    let err = Masker::new(&Config {
        detectors: Vec::new(),
        custom: vec![("broken".into(), "(".into())],
    });
    match err {
        Err(e) => assert!(e.to_string().contains("broken"), "{e}"),
        Ok(_) => panic!("an invalid expression compiled"),
    }
}

#[test]
fn non_utf8_bytes_do_not_stop_masking() {
    let m = masker();
    let mut input = vec![0xff, 0xfe];
    input.extend_from_slice(b" 123-45-6789 ");
    input.push(0xc3);
    let out = m.mask(&input, &mut Counts::new()).unwrap_or_default();
    assert_eq!(&out[..2], &[0xff, 0xfe]);
    assert_eq!(&out[2..15], b" ***-**-6789 ");
}

#[test]
fn labelled_corpus_recall_and_no_false_positives() {
    let m = masker();
    let mut per_label: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut wrongly_masked = Vec::new();
    let mut missed = Vec::new();
    for line in include_str!("../testdata/corpus.tsv").lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((label, value)) = line.split_once('\t') else {
            panic!("bad corpus line {line:?}");
        };
        let (out, counts) = masked(&m, value);
        if label == "none" {
            if out != value {
                wrongly_masked.push(format!("{value} -> {out} {counts:?}"));
            }
            continue;
        }
        let e = per_label.entry(label).or_default();
        e.0 += 1;
        if counts.get(label).is_some_and(|n| *n >= 1) && out != value {
            e.1 += 1;
            // Masked values are masked for good.
            assert!(masked(&m, &out).1.is_empty(), "{out}");
        } else {
            missed.push(format!("{label}: {value} -> {out} {counts:?}"));
        }
    }
    let total: usize = per_label.values().map(|(n, _)| n).sum();
    assert!(total + wrongly_masked.len() >= 500, "corpus too small");
    assert!(
        wrongly_masked.is_empty(),
        "masked look-alikes:\n{}",
        wrongly_masked.join("\n")
    );
    for (label, (n, hit)) in &per_label {
        let recall = *hit as f64 / *n as f64;
        println!("{label}: {hit}/{n} recall {recall:.3}");
        if matches!(*label, "card" | "iban" | "us_ssn") {
            assert!(
                recall >= 0.99,
                "{label} recall {recall}\n{}",
                missed.join("\n")
            );
        }
    }
    assert!(missed.is_empty(), "missed:\n{}", missed.join("\n"));
}

#[test]
fn a_row_is_masked_in_one_scan_without_values_running_together() {
    let m = masker();
    // Digits at the end of one value and the start of the next must not
    // make a card number together.
    let row: [&[u8]; 4] = [b"4242 4242", b"4242 4242", b"ada@example.com", b"plain"];
    let mut counts = Counts::new();
    let out = m.mask_row(&row, &mut counts).unwrap_or_default();
    assert_eq!(
        out,
        vec![
            b"4242 4242".to_vec(),
            b"4242 4242".to_vec(),
            b"a***@example.com".to_vec(),
            b"plain".to_vec()
        ]
    );
    assert_eq!(counts.get("card"), None);
    assert!(m.mask_row(&[b"a", b"b"], &mut Counts::new()).is_none());
    // A value with NUL (bytea) falls back to value by value.
    let row: [&[u8]; 2] = [b"\x00\x01", b"123-45-6789"];
    let out = m.mask_row(&row, &mut Counts::new()).unwrap_or_default();
    assert_eq!(out, vec![b"\x00\x01".to_vec(), b"***-**-6789".to_vec()]);
}
