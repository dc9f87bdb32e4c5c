from owl2_edge.detok import Utf8Stream

PIECES = {1: "▁Hi".replace("▁", " ").encode(), 2: b"\xe6", 3: b"\x97", 4: b"\xa5", 5: b"!", 6: b"\xff"}


def test_multibyte_character_is_held_until_complete():
    s = Utf8Stream(PIECES.__getitem__)
    assert [s.push(t) for t in (1, 2, 3, 4, 5)] == [" Hi", "", "", "日", "!"]
    assert s.flush() == ""


def test_invalid_bytes_are_shown_not_held_forever():
    s = Utf8Stream(PIECES.__getitem__)
    assert s.push(6) == "\ufffd"
    assert s.push(2) == "" and s.flush() == "\ufffd"
