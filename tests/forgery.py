"""Tokens altered the way an attacker would, for the token and fuzz tests."""


def wrong_signature(token: str) -> str:
    """The token with the first character of its signature changed. (Not the last:
    in base64 of a 16-byte tag the last character holds 2 bits, so replacing it
    with a fixed letter leaves it unchanged one time in four.)"""
    body, _, signature = token.rpartition(".")
    return f"{body}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"
