"""Data sources beyond the COCO root: Flickr30k's caption files, a COCO split folder as --data_dir,
and the COCO 2017 download script (against a local HTTP server, with and without Range support)."""
import io
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from data import download_coco2017 as dl
from data.coco import (CocoImageCaptionDataset, CocoImagesOnlyDataset, ImageFolderDataset, coco_root,
                       make_images_dataset)
from errors import BadInput


def save_image(path, seed=0, size=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(path)


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Flickr30k

CAPTIONS_TXT = '''image,caption
1000092795.jpg,Two young guys with shaggy hair look at their hands .
1000092795.jpg," Two young , White males are outside near many bushes ."

10002456.jpg,Several men in hard hats, operating a giant pulley system .
10002456.jpg,Workers look down from up above on a piece of equipment .
1000092795.jpg,Two men in green shirts are standing in a yard .
'''
TOKEN = '''1000092795.jpg#0\tTwo young guys with shaggy hair look at their hands .
1000092795.jpg#1\tTwo young , White males are outside near many bushes .
10002456.jpg#0\tSeveral men in hard hats are operating a giant pulley system .
'''
A, B = 1000092795, 10002456


def make_flickr(root, caption_file="captions.txt", image_dir="Images", names=("1000092795.jpg", "10002456.jpg")):
    os.makedirs(root, exist_ok=True)
    text = CAPTIONS_TXT if caption_file == "captions.txt" else TOKEN
    for old, new in zip(("1000092795.jpg", "10002456.jpg"), names):
        text = text.replace(old, new)
    with open(os.path.join(root, caption_file), "w") as f:
        f.write(text)
    for i, name in enumerate(names):
        save_image(os.path.join(root, image_dir, name), seed=i)
    return str(root)


def test_flickr30k_captions_txt_behaves_like_coco(tmp_path):
    root = make_flickr(tmp_path / "f30k")
    ds = CocoImageCaptionDataset(root, "train", 8, data_format="flickr30k")
    assert ds.image_ids == [A, B]  # order of first appearance
    assert ds.captions_by_image[A] == ["Two young guys with shaggy hair look at their hands .",
                                       "Two young , White males are outside near many bushes .",
                                       "Two men in green shirts are standing in a yard ."]
    # an unquoted caption with a comma stays whole
    assert ds.captions_by_image[B][0] == "Several men in hard hats, operating a giant pulley system ."
    assert len(ds) == 5 and [i for i, _ in ds.items] == [A, A, A, B, B]  # grouped by image
    assert ds.first_items() == {A: 0, B: 3}
    assert ds.images_info[B] == {"id": B, "file_name": "10002456.jpg"}
    assert ds.image_path(A) == os.path.join(root, "Images", "1000092795.jpg")
    item = ds[4]
    assert item["pixel_values"].shape == (3, 8, 8) and item["image_id"] == B and item["index"] == 4
    assert item["caption"] == ds.items[4][1]
    ds.repeat_images({B: 2})
    assert len(ds) == 7
    images = CocoImagesOnlyDataset(root, "train", 8, 1.0, None, 0, "flickr30k")
    assert images.image_ids == [A, B] and images[1]["image_id"] == B
    made = make_images_dataset(root, "train", 8, data_format="flickr30k")
    assert isinstance(made, CocoImagesOnlyDataset) and made.image_ids == [A, B]
    # the same subset for images-only and captions, as with COCO
    kw = dict(subset_ratio=0.5, seed=3, data_format="flickr30k")
    assert CocoImagesOnlyDataset(root, "train", 8, **kw).image_ids == CocoImageCaptionDataset(root, "train", 8,
                                                                                              **kw).image_ids


@pytest.mark.parametrize("image_dir", ["flickr30k_images", "Images", ""])
def test_flickr30k_token_file_and_image_folders(tmp_path, image_dir):
    root = make_flickr(tmp_path / "f30k", "results_20130124.token", image_dir)
    ds = CocoImageCaptionDataset(root, "train", 8, data_format="flickr30k")
    assert ds.captions_by_image == {A: ["Two young guys with shaggy hair look at their hands .",
                                        "Two young , White males are outside near many bushes ."],
                                    B: ["Several men in hard hats are operating a giant pulley system ."]}
    assert ds.image_path(B) == os.path.join(root, image_dir, "10002456.jpg")
    assert all(ds[i] is not None for i in range(len(ds))) and ds.num_skipped == 0


def test_flickr30k_non_numeric_names_numbered_in_order(tmp_path):
    root = make_flickr(tmp_path / "f30k", names=("beach.jpg", "1234.jpg"))
    ds = CocoImageCaptionDataset(root, "train", 8, data_format="flickr30k")
    assert ds.image_ids == [1, 2]  # one name is not a number: every image by order, no collisions
    assert ds.images_info[2]["file_name"] == "1234.jpg" and ds[4]["image_id"] == 2


def test_flickr30k_karpathy_split(tmp_path):
    root = str(tmp_path / "f30k")
    entries = []
    for i, split in enumerate(["train", "val", "test", "train", "restval"]):
        name = f"{100 + i}.jpg"
        save_image(os.path.join(root, "flickr30k_images", name), seed=i)
        entries.append({"filename": name, "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
                        "sentences": [{"raw": f" image {i} a ", "tokens": []}, {"raw": f"image {i} b"}]})
    kjson = str(tmp_path / "dataset_flickr30k.json")
    with open(kjson, "w") as f:
        json.dump({"images": entries, "dataset": "flickr30k"}, f)
    train = CocoImageCaptionDataset(root, "train", 8, karpathy_json=kjson, data_format="flickr30k")
    assert train.image_ids == [100, 103, 104]  # train + restval; ids are the numeric stems
    assert train.captions_by_image[100] == ["image 0 a", "image 0 b"]
    info = train.images_info[104]
    assert info["split"] == "restval" and "sentences" not in info and info["file_name"] == "104.jpg"
    assert train.image_path(103) == os.path.join(root, "flickr30k_images", "103.jpg")
    assert train[0]["pixel_values"].shape == (3, 8, 8)
    val = CocoImagesOnlyDataset(root, "val", 8, karpathy_json=kjson, data_format="flickr30k")
    test = CocoImageCaptionDataset(root, "test", 8, karpathy_json=kjson, data_format="flickr30k")
    assert val.image_ids == [101] and test.image_ids == [102]
    with pytest.raises(BadInput) as e:
        CocoImageCaptionDataset(root, "validation", 8, karpathy_json=kjson, data_format="flickr30k")
    assert "--split validation is not a Karpathy split" in one_line(e)


def test_flickr30k_bad_input(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(BadInput) as e:
        CocoImageCaptionDataset(empty, "train", 8, data_format="flickr30k")
    msg = one_line(e)
    assert empty in msg and "captions.txt" in msg and "results_20130124.token" in msg
    root = make_flickr(tmp_path / "f30k")
    for split in ("val", "test"):
        with pytest.raises(BadInput) as e:
            CocoImageCaptionDataset(root, split, 8, data_format="flickr30k")
        assert f"--split {split}" in one_line(e) and "--karpathy_json" in str(e.value)
    with open(os.path.join(root, "captions.txt"), "a") as f:
        f.write("lonely.jpg\n")
    with pytest.raises(BadInput) as e:
        CocoImagesOnlyDataset(root, "train", 8, data_format="flickr30k")
    assert "captions.txt line 8" in one_line(e)
    for make in (lambda: CocoImageCaptionDataset(root, "train", 8, data_format="flickr"),
                 lambda: make_images_dataset(root, "train", 8, data_format="flickr")):
        with pytest.raises(BadInput) as e:
            make()
        assert "--data_format flickr is not known; use one of coco, flickr30k" in one_line(e)
    missing = str(tmp_path / "nope")
    with pytest.raises(BadInput) as e:
        make_images_dataset(missing, "train", 8, data_format="flickr30k")
    assert f"--data_dir {missing} does not exist" in one_line(e) and "Flickr30k" in str(e.value)


# ---------------------------------------------------------------------------------------------
# A COCO split folder as --data_dir

def make_coco(root):
    for split, ids in (("train", (1, 2, 3)), ("val", (7,))):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        anns = [{"id": 10 * i + k, "image_id": i, "caption": f"{split} {i} {k}"} for i in ids for k in range(2)]
        for i in ids:
            save_image(os.path.join(root, f"{split}2017", f"{i:012d}.jpg"), seed=i)
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"captions_{split}2017.json"), "w") as f:
            json.dump({"images": images, "annotations": anns}, f)
    return str(root)


def test_split_folder_reads_the_coco_root(tmp_path, monkeypatch):
    root = make_coco(tmp_path / "coco2017")
    whole = CocoImageCaptionDataset(root, "train", 8)
    with pytest.warns(UserWarning, match="is a COCO split folder: reading the COCO root") as caught:
        ds = CocoImageCaptionDataset(os.path.join(root, "train2017") + os.sep, "train", 8)
    assert len(caught) == 1 and "(not --split" not in str(caught[0].message)
    assert ds.items == whole.items and ds.data_dir == root and ds.split == "train"
    assert ds.image_path(1) == whole.image_path(1) and ds[0]["pixel_values"].shape == (3, 8, 8)
    # the folder names the split: val2017 with the default --split train reads val
    with pytest.warns(UserWarning, match=r"split val \(not --split train\)"):
        val = CocoImagesOnlyDataset(os.path.join(root, "val2017"), "train", 8)
    assert val.image_ids == [7] and val.split == "val"
    with pytest.warns(UserWarning):
        made = make_images_dataset(os.path.join(root, "train2017"), "train", 8, 0.5, None, 0)
    assert isinstance(made, CocoImagesOnlyDataset)
    assert made.image_ids == CocoImagesOnlyDataset(root, "train", 8, 0.5, None, 0).image_ids
    # a relative path stays relative
    monkeypatch.chdir(tmp_path)
    assert coco_root("coco2017/train2017", "val") == ("coco2017", "train", True)
    monkeypatch.chdir(os.path.join(root, "train2017"))
    assert coco_root(".", "train") == (".", "train", False)  # basename "." is no split folder
    assert coco_root(root, "val") == (root, "val", False)


def test_folder_named_2017_without_coco_parent_is_a_folder(tmp_path):
    folder = str(tmp_path / "photos" / "holiday2017")
    save_image(os.path.join(folder, "a.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(make_images_dataset(folder, "train", 8), ImageFolderDataset)
    with pytest.raises(BadInput) as e:
        CocoImageCaptionDataset(folder, "train", 8)
    assert "captions_train2017.json does not exist" in one_line(e)


# ---------------------------------------------------------------------------------------------
# Downloading COCO 2017

def noise_jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_zip(path, members):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # stored: half the file is half the bytes
        for name, data in members.items():
            z.writestr(name, data)


def coco_host_files(root):
    """The official host's layout, tiny: zips/{train,val}2017.zip, annotations/annotations_trainval2017.zip."""
    files = {"train2017/000000000001.jpg": noise_jpeg(1), "val2017/000000000002.jpg": noise_jpeg(2)}
    for split, i in (("train", 1), ("val", 2)):
        ann = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"}],
               "annotations": [{"id": i, "image_id": i, "caption": f"noise {split}"}]}
        files[f"annotations/captions_{split}2017.json"] = json.dumps(ann).encode()
    write_zip(os.path.join(root, "zips", "train2017.zip"), {k: v for k, v in files.items() if k.startswith("train")})
    write_zip(os.path.join(root, "zips", "val2017.zip"), {k: v for k, v in files.items() if k.startswith("val")})
    write_zip(os.path.join(root, "annotations", "annotations_trainval2017.zip"),
              {k: v for k, v in files.items() if k.startswith("annotations")})
    return files


class Host(BaseHTTPRequestHandler):
    """Serves server.root; Range requests when server.ranges (else 200, the whole file);
    server.cut: send only that many bytes of the body, then close (a dropped connection)."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        path = os.path.join(srv.root, self.path.lstrip("/"))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            data = f.read()
        start, wanted = 0, self.headers.get("Range")
        if wanted and srv.ranges:
            start = int(wanted.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if srv.cut is None else body[:srv.cut])

    def log_message(self, *args):
        pass


@pytest.fixture
def host(tmp_path):
    root = str(tmp_path / "host")
    server = HTTPServer(("127.0.0.1", 0), Host)
    server.root, server.ranges, server.cut, server.requests = root, True, None, []
    server.files = coco_host_files(root)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now: connection refused


def listing(folder):
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, names in os.walk(folder) for n in names)


def test_download_all_unzips_and_a_second_run_does_nothing(host, tmp_path, capsys):
    out = str(tmp_path / "coco2017")
    dl.main(["--all", "--out_dir", out, "--base_url", host.url])
    assert listing(out) == sorted(host.files)  # zips deleted, no .part or unzip folder left
    for rel, data in host.files.items():
        with open(os.path.join(out, rel), "rb") as f:
            assert f.read() == data, rel
    assert [p for p, _ in host.requests] == ["/annotations/annotations_trainval2017.zip",
                                             "/zips/val2017.zip", "/zips/train2017.zip"]
    ds = CocoImageCaptionDataset(out, "train", 8)  # the layout data/coco.py reads
    assert ds.captions_by_image == {1: ["noise train"]} and ds[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.warns(UserWarning, match="COCO split folder"):  # and the seed's --data_dir
        assert CocoImagesOnlyDataset(os.path.join(out, "val2017"), image_size=8).image_ids == [2]

    capsys.readouterr()
    dl.main(["--all", "--out_dir", out, "--base_url", host.url])
    assert len(host.requests) == 3  # nothing asked of the server
    assert capsys.readouterr().out.count("skipped") == 3
    dl.main(["--train", "--out_dir", out, "--base_url", closed_port_url()])  # done: no network needed


@pytest.mark.parametrize("ranges", [True, False])
def test_resume_a_half_written_part(host, tmp_path, ranges):
    host.ranges = ranges
    served = open(os.path.join(host.root, "zips", "val2017.zip"), "rb").read()
    dest = str(tmp_path / "val2017.zip")
    with open(dest + ".part", "wb") as f:
        f.write(served[:len(served) // 2])
    dl.download(f"{host.url}/zips/val2017.zip", dest)
    assert open(dest, "rb").read() == served and not os.path.exists(dest + ".part")
    assert host.requests == [("/zips/val2017.zip", f"bytes={len(served) // 2}-")]
    # a .part that already holds the whole file: the server has nothing after it (416)
    with open(dest + ".part", "wb") as f:
        f.write(served)
    os.remove(dest)
    dl.download(f"{host.url}/zips/val2017.zip", dest)
    assert open(dest, "rb").read() == served


@pytest.mark.parametrize("ranges", [True, False])
def test_dropped_connection_then_rerun_resumes(host, tmp_path, ranges):
    host.ranges, host.cut = ranges, 3000
    out = str(tmp_path / "coco2017")
    argv = ["--val", "--out_dir", out, "--base_url", host.url]
    with pytest.raises(BadInput) as e:
        dl.main(argv)
    assert "connection closed at 3000 of" in one_line(e) and "rerun to resume" in str(e.value)
    assert os.path.getsize(os.path.join(out, "val2017.zip.part")) == 3000 and not os.path.exists(
        os.path.join(out, "val2017"))
    host.cut = None
    dl.main(argv)
    assert host.requests[-1][1] == "bytes=3000-"
    assert open(os.path.join(out, "val2017", "000000000002.jpg"), "rb").read() == host.files[
        "val2017/000000000002.jpg"]
    assert listing(out) == ["val2017/000000000002.jpg"]


def test_wrong_md5_or_size_deletes_the_download(host, tmp_path):
    dest = str(tmp_path / "val2017.zip")
    with pytest.raises(BadInput) as e:
        dl.download(f"{host.url}/zips/val2017.zip", dest, md5="0" * 32)
    assert "md5" in one_line(e) and "rerun to download it again" in str(e.value)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    with pytest.raises(BadInput) as e:
        dl.download(f"{host.url}/zips/val2017.zip", dest, size=12345)
    assert "not 12345" in one_line(e) and not os.path.exists(dest + ".part")
    size = os.path.getsize(os.path.join(host.root, "zips", "val2017.zip"))
    with open(os.path.join(host.root, "zips", "val2017.zip"), "rb") as f:
        md5 = dl.hashlib.md5(f.read()).hexdigest()
    dl.download(f"{host.url}/zips/val2017.zip", dest, size=size, md5=md5)
    assert os.path.getsize(dest) == size


def test_offline_is_one_line_and_zips_by_hand_only_unzip(host, tmp_path):
    out = str(tmp_path / "coco2017")
    offline = closed_port_url()
    with pytest.raises(BadInput) as e:
        dl.main(["--all", "--out_dir", out, "--base_url", offline])
    msg = one_line(e)
    assert f"cannot reach {offline}/annotations/annotations_trainval2017.zip" in msg
    assert "by hand" in msg and f"into {out}/ and rerun" in msg
    # the script's own entry point: that one line and exit status 2
    run = subprocess.run([sys.executable, "-m", "data.download_coco2017", "--val", "--out_dir", out,
                          "--base_url", offline], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(dl.__file__))))
    assert run.returncode == 2 and run.stderr.startswith("error: cannot reach") and run.stderr.count("\n") == 1
    # the zips put in out_dir by hand: no network needed, only unzipping
    for rel in ("zips/train2017.zip", "zips/val2017.zip", "annotations/annotations_trainval2017.zip"):
        with open(os.path.join(host.root, rel), "rb") as src, open(os.path.join(out, os.path.basename(rel)), "wb") as f:
            f.write(src.read())
    dl.main(["--all", "--out_dir", out, "--base_url", offline, "--keep_zips"])
    assert listing(out) == sorted([*host.files, "train2017.zip", "val2017.zip", "annotations_trainval2017.zip"])


def test_bad_zip_nothing_chosen_and_404(host, tmp_path):
    out = str(tmp_path / "coco2017")
    os.makedirs(out)
    with open(os.path.join(out, "val2017.zip"), "wb") as f:
        f.write(b"PK not really a zip")
    with pytest.raises(BadInput) as e:
        dl.main(["--val", "--out_dir", out, "--base_url", host.url])
    assert "val2017.zip: not a complete zip" in one_line(e) and not os.path.exists(os.path.join(out, "val2017"))
    with pytest.raises(BadInput) as e:
        dl.main(["--out_dir", out])
    assert "nothing to download: pass --all, or any of --train, --val, --annotations" in one_line(e)
    with pytest.raises(BadInput) as e:
        dl.main(["--train", "--out_dir", out, "--base_url", host.url + "/mirror"])
    assert "answered 404" in one_line(e) and "--base_url" in str(e.value)
