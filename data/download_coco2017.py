"""Download and unzip COCO 2017 (images and caption annotations), as the VLV seed's data step:

    python -m data.download_coco2017 --all --out_dir data/coco2017

gives out_dir/train2017/, out_dir/val2017/ and out_dir/annotations/captions_{train,val}2017.json,
the layout data/coco.py reads. Pick parts with --train, --val, --annotations (--all: every one).

Per part: skipped when its files are already in out_dir; else the zip is downloaded to
out_dir/<zip>.part (resumed with an HTTP Range request when a .part is there and the server takes
ranges, started over when it answers 200), checked against Content-Length (and, from the official
host, against the official size and md5), renamed to out_dir/<zip>, unzipped (into a hidden
folder first, moved into place when complete) and deleted (--keep_zips keeps it). Offline? Put the
zips in out_dir/ by hand and rerun: a zip already there is only unzipped.
"""
import argparse
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib

from tqdm import tqdm

import errors
from data.files import replace
from errors import BadInput

OFFICIAL_URL = "http://images.cocodataset.org"
# part -> (path under the base URL, what its zip puts in out_dir: the proof it is done)
PARTS = {
    "annotations": ("annotations/annotations_trainval2017.zip",
                    ("annotations/captions_train2017.json", "annotations/captions_val2017.json")),
    "val": ("zips/val2017.zip", ("val2017",)),
    "train": ("zips/train2017.zip", ("train2017",)),
}
# The official files' sizes and md5 (as published with COCO and used by PaddleDetection and
# others); checked only for downloads from OFFICIAL_URL, since a mirror or a test server may
# serve other bytes under the same names.
OFFICIAL = {
    "annotations_trainval2017.zip": (252907541, "f4bbac642086de4f52a3fdda2de5fa2c"),
    "val2017.zip": (815585330, "442b8da7639aecaf257c1dceb8ba8c80"),
    "train2017.zip": (19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
}
CHUNK = 1 << 20
TIMEOUT_S = 60


def _offline(url, reason, dest):
    name, folder = os.path.basename(dest), os.path.dirname(dest) or "."
    return BadInput(f"cannot reach {url} ({reason}); download {name} by hand (e.g. on another machine) "
                    f"into {folder}/ and rerun, which then only unzips it")


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _range_of(header):
    """'bytes 100-199/200' -> (100, 200); 'bytes */200' -> (None, 200); unknown parts None."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _open(url, have, dest):
    """-> (response, have): have is where the response's body starts in the file (0 when the
    server sends it all), or (None, have) when the .part already holds the whole file."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing from byte `have` on: complete, or longer than the file
            total = _range_of(e.headers.get("Content-Range"))[1]
            if total == have:
                return None, have
            os.remove(dest + ".part")
            return _open(url, 0, dest)
        raise BadInput(f"{url}: the server answered {e.code} {e.reason}; check --base_url "
                       f"(default {OFFICIAL_URL})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, DNS, timeout
        raise _offline(url, getattr(e, "reason", None) or e, dest) from None
    if resp.status == 206:
        start, _ = _range_of(resp.headers.get("Content-Range"))
        if start == have:
            return resp, have
        resp.close()  # a range other than the one asked for: not worth piecing together
        os.remove(dest + ".part")
        return _open(url, 0, dest)
    return resp, 0  # 200: the whole file (a server without ranges ignores the header)


def download(url, dest, size=None, md5=None):
    """url -> dest through dest.part, resumed when the .part is there. size/md5: the expected
    file, when known. A dropped connection leaves the .part for the next run to resume; a file
    that is whole but wrong (size, md5) is deleted."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    resp, have = _open(url, have, dest)
    total = have
    if resp is not None:
        with resp:
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            name = os.path.basename(dest)
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=name, mininterval=1.0) as bar:
                try:
                    while chunk := resp.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    f.flush()
                    raise BadInput(f"{url}: the download broke off at {f.tell()} bytes ({e}); "
                                   f"rerun to resume from {part}") from None
    got = os.path.getsize(part)
    if total is not None and got < total:
        raise BadInput(f"{url}: the connection closed at {got} of {total} bytes; rerun to resume from {part}")
    wrong = None
    if (total is not None and got != total) or (size is not None and got != size):
        wrong = f"{got} bytes, not {size if size is not None else total}"
    elif md5 is not None and (digest := _md5(part)) != md5:
        wrong = f"md5 {digest}, not {md5}"
    if wrong:
        os.remove(part)
        raise BadInput(f"{url}: the download is {wrong}; deleted {part}, rerun to download it again")
    replace(part, dest)
    return dest


def _move(src, dst):
    """Move src to dst; into an existing folder, entry by entry (a file there is replaced)."""
    if os.path.isdir(src) and os.path.isdir(dst):
        for name in os.listdir(src):
            _move(os.path.join(src, name), os.path.join(dst, name))
        os.rmdir(src)
    else:
        os.replace(src, dst)


def unzip(zip_path, out_dir):
    """Extract into a hidden folder of out_dir, then move each top entry into out_dir: a folder
    new to out_dir (train2017/) appears at once, complete, so an interrupted unzip never looks done."""
    tmp = os.path.join(out_dir, f".unzip-{os.path.basename(zip_path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            for member in tqdm(z.infolist(), desc=f"unzip {os.path.basename(zip_path)}", unit="file",
                               mininterval=1.0):
                z.extract(member, tmp)  # extract() drops absolute paths and ..: nothing lands outside tmp
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInput(f"{zip_path}: not a complete zip ({e}); delete it (or, if partly downloaded, rename it "
                       f"to {os.path.basename(zip_path)}.part to resume) and rerun") from None
    for name in sorted(os.listdir(tmp)):
        _move(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def is_done(out_dir, part):
    """Whether every file a part's zip puts in out_dir is there (a folder: with something in it)."""
    def there(rel):
        path = os.path.join(out_dir, rel)
        return bool(os.listdir(path)) if os.path.isdir(path) else os.path.isfile(path)
    return all(there(rel) for rel in PARTS[part][1])


def fetch_part(part, out_dir, base_url=OFFICIAL_URL, keep_zip=False):
    """Download (unless the zip is in out_dir) and unzip one part; nothing when it is done."""
    rel, outputs = PARTS[part]
    if is_done(out_dir, part):
        print(f"{part}: {', '.join(outputs)} already in {out_dir}, skipped")
        return False
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(rel)
    zip_path = os.path.join(out_dir, name)
    official = OFFICIAL.get(name) if base_url.rstrip("/") == OFFICIAL_URL else None
    if os.path.isfile(zip_path):
        # Put here by hand, or kept: only the size is checked (an md5 of 19 GB is a long wait;
        # a damaged zip fails its CRC check while unzipping).
        if official and os.path.getsize(zip_path) != official[0]:
            raise BadInput(f"{zip_path} is {os.path.getsize(zip_path)} bytes, not the official {official[0]}: "
                           f"if partly downloaded, rename it to {name}.part and rerun to resume, else delete it")
        print(f"{part}: unzipping {zip_path} (already there)")
    else:
        url = f"{base_url.rstrip('/')}/{rel}"
        print(f"{part}: downloading {url}")
        download(url, zip_path, *(official or (None, None)))
    unzip(zip_path, out_dir)
    if not keep_zip:
        os.remove(zip_path)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="train, val and annotations")
    p.add_argument("--train", action="store_true", help="train2017.zip (18 GB) -> out_dir/train2017/")
    p.add_argument("--val", action="store_true", help="val2017.zip (780 MB) -> out_dir/val2017/")
    p.add_argument("--annotations", action="store_true",
                   help="annotations_trainval2017.zip (240 MB) -> out_dir/annotations/")
    p.add_argument("--out_dir", default="data/coco2017")
    p.add_argument("--base_url", default=OFFICIAL_URL, help="the host serving zips/ and annotations/")
    p.add_argument("--keep_zips", action="store_true", help="keep each zip after unzipping it")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    parts = [part for part in PARTS if args.all or getattr(args, part)]
    if not parts:
        raise BadInput("nothing to download: pass --all, or any of --train, --val, --annotations")
    for part in parts:
        fetch_part(part, args.out_dir, args.base_url, args.keep_zips)
    print(f"COCO 2017 in {args.out_dir}: {', '.join(parts)}")


if __name__ == "__main__":
    errors.run(main)
