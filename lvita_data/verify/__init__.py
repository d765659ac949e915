"""`lvita verify DIR`: check a finished build byte by byte and sample by sample.

What is checked (shard formats 1 and 2, see `lvita_data.shards.format`), and where:
1. Files (`accounting`): every shard of `index.json` exists with its size and sha256 (`shard`); no
   other `*.tar`, no leftover `*.tmp-*`; `stats.json` and `rejects.jsonl` parse.
2. Tar structure (`shard`), with the lenient parser of `lvita_data.shards.tar`: every header is
   the one lvita's writer produces, padding and trailer are zero, members of a sample are
   contiguous, keys are unique across shards (`run`); a damaged header is attributed to its
   sample key, or the nearest key when its name is damaged too.
3. Per sample (`sample`, with vision blocks, ChatML turns and labels in `text`): members
   (format 3: exactly `arrays.npz`, `media.tar` - a canonical tar of image and tile members -
   and `meta.json`), arrays (one canonical `arrays.npz`, inflated with a bound; format 1:
   canonical `.npy` members), shapes, `cu_seqlens`, canonical `meta.json`, alignment, padding,
   positions, vocabulary, vision blocks, labels equal to the template's, tiles (count, PNG CRCs,
   448x448 RGB, decoding); the source images (`images`: names, references, header size,
   container, decoding) and the placeholder accounting of stored and cut tiles.
4. Per-sample digests (`shard`), when the build recorded them: a changed byte anywhere inside a
   sample's member data names the shard and key even where the content passes every invariant.
5. Accounting (`accounting`): per dataset, selected == packed + rejected; shard counts ==
   `index.json`; totals == `stats.json`; keys and packs against `.lvita-build/plan.json`.
6. Energon metadata, when `.nv-meta/` exists (`run`): see
   `lvita_data.shards.energon.check_energon_metadata`.

The build settings it checks against come from `settings`; the findings are `report.Problem`s in
a `report.VerifyReport`. Verify never raises for a damaged build: `pipelines.cli` prints the
report and maps "problems found" to its exit code.
"""

from lvita_data.verify.report import Problem, VerifyReport
from lvita_data.verify.run import verify_build
from lvita_data.verify.sample import check_sample
from lvita_data.verify.settings import load_settings
from lvita_data.verify.shard import verify_shard

__all__ = [
    "Problem",
    "VerifyReport",
    "check_sample",
    "load_settings",
    "verify_build",
    "verify_shard",
]
