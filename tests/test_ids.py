"""Job and call ids: time-ordered version-7 UUIDs, and job ids accepted in any form a UUID takes."""

import time
import uuid

from proxy.ids import canonical_uuid, new_id


def test_new_ids_are_unique_canonical_version_7_uuids():
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for text in list(ids)[:500]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_new_ids_begin_with_the_time_they_were_made_so_later_ids_sort_later():
    before = time.time_ns() // 1_000_000
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= uuid.UUID(first).int >> 80 <= uuid.UUID(second).int >> 80 <= after
    assert first < second


def test_every_random_bit_of_a_new_id_varies():
    # 74 bits: 12 between the version and the variant, 62 after it.
    random_bits = [*range(64, 76), *range(62)]
    values = [uuid.UUID(new_id()).int for _ in range(200)]
    assert [bit for bit in random_bits if len({value >> bit & 1 for value in values}) == 1] == []


def test_a_uuid_in_any_case_is_read_as_its_lower_case_form():
    text = "abcdef01-2345-7abc-8def-0123456789ab"
    for upper in (slice(0, 8), slice(9, 13), slice(24, 36)):
        assert canonical_uuid(text[:upper.start] + text[upper].upper() + text[upper.stop:]) == text


def test_a_uuid_in_another_form_is_read_as_its_canonical_form():
    text = new_id()
    assert canonical_uuid(text) == text
    assert canonical_uuid(text.upper()) == text
    assert canonical_uuid("{" + text + "}") == text
    assert canonical_uuid(text.replace("-", "")) == text


def test_anything_else_is_not_a_uuid():
    for text in ("", "job-1", new_id()[:-1], new_id() + "0", "g" * 32):
        assert canonical_uuid(text) is None


def test_what_pythons_uuid_reads_but_no_uuid_form_is_is_not_a_uuid():
    canonical = new_id()
    hex32 = canonical.replace("-", "")
    for text in (
        " " + hex32[1:],  # int() takes the space for nothing: 31 digits read as 32
        "\u0660" + hex32[1:],  # an Arabic-Indic digit
        hex32[:4] + "_" + hex32[5:],  # read as a UUID that is not this one
        hex32[:8] + "-" * 10 + hex32[8:],
        "-" + hex32 + "-",
        "{{" + hex32 + "}}",
        "urn:uuid:urn:" + hex32,
        "urn:uuid:urn:uuid:" + hex32,
        "urn:uu\u0131d:" + hex32,  # a dotless i, which a case-blind Unicode match takes for an i
        hex32[:8] + "-" + hex32[8:],  # hyphens, but not all of them
        *(canonical[:at] + canonical[at + 1:] for at in (8, 13, 18, 23)),  # all of them but one
        "{" + hex32,
    ):
        assert canonical_uuid(text) is None, text
    assert canonical_uuid("URN:UUID:" + hex32.upper()) == canonical_uuid(hex32)
    assert canonical_uuid("{" + hex32 + "}") == canonical_uuid(hex32)
