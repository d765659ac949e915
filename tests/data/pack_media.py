"""A format-3 pack's media in tests: `media_members` reads a `media.tar` with `tarfile` (not with
lvita's reader, so the tests check it independently), `flat` puts its members next to the
pack's own, `packed` puts them back into a canonical `media.tar` (`media_tar_bytes`)."""

from __future__ import annotations

import io
import tarfile

from lvita_data.shards.format import MEDIA_NAME, MEDIA_TAR, media_tar_bytes


def media_members(data: bytes) -> dict[str, bytes]:
    """The members of a pack's media.tar, by name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as media:
        return {member.name: media.extractfile(member).read() for member in media}


def flat(members: dict[str, bytes]) -> dict[str, bytes]:
    """A pack with the members of its media.tar next to its own (media.tar kept too)."""
    if MEDIA_TAR not in members:
        return members
    return {**members, **media_members(members[MEDIA_TAR])}


def packed(flat_pack: dict[str, bytes], *, keep_media_tar: bool = False) -> dict[str, bytes]:
    """A flat pack as the shard holds it: its image and tile members back in a canonical
    media.tar (when it had one or has media), every other member as it is; with
    `keep_media_tar` its media.tar is kept as it is and the loose image and tile members go."""
    media = {name: data for name, data in flat_pack.items() if MEDIA_NAME.match(name)}
    out = {name: data for name, data in flat_pack.items() if name not in media}
    if not keep_media_tar and (MEDIA_TAR in out or media):
        out[MEDIA_TAR] = media_tar_bytes(media)
    return out
