#!/usr/bin/env python3
"""Reference side of the webdataset compatibility test (tests/tests/shards.rs).

  shards_reference.py read SHARD...      read shards with the `webdataset` package and print one JSON
                                         list of samples: {"key", "members": {ext: value}} where
                                         txt is the decoded text, json the parsed object, and any
                                         other member the hex of its bytes.
  shards_reference.py write OUT.tar N    write N samples with `webdataset.TarWriter` (JPEG and PNG
                                         images made with PIL, unicode texts, JSON metadata with
                                         refined texts under "hq_clip", a key inside a folder and
                                         one whose path needs the ustar prefix field) and print the
                                         samples written, in the same JSON shape as `read`.
"""
import io
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import webdataset as wds  # noqa: E402


def member_value(ext, data):
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    return data.hex()


def read(paths):
    out = []
    ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False)
    for sample in ds:
        members = {k: member_value(k, v) for k, v in sample.items() if not k.startswith("__")}
        out.append({"key": sample["__key__"], "members": members})
    json.dump(out, sys.stdout, ensure_ascii=False)


def image_bytes(i, fmt):
    from PIL import Image

    w, h = 16 + 8 * (i % 3), 12 + 4 * (i % 4)
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 17 + i * 5) % 256, (y * 29) % 256, (x * y + i) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write(path, n):
    written = []
    with wds.TarWriter(path) as sink:
        for i in range(n):
            key = f"{i:06d}"
            if i == 3:
                key = f"sub/{i:06d}"
            if i == 5:
                key = "d" * 120 + f"/{i:06d}"
            ext = "png" if i % 4 == 1 else "jpg"
            img = image_bytes(i, "PNG" if ext == "png" else "JPEG")
            text = f"sample {i}: caf\u00e9 \u2014 \u65e5\u672c {'x' * i}"
            meta = {"uid": f"uid{i:04d}", "url": f"http://example.com/{i}.jpg", "width": 16, "nested": {"a": [1, 2.5, None]}}
            if i % 2 == 0:
                meta["hq_clip"] = {
                    "long_positive": f"The image shows pattern {i}, with stripes.",
                    "long_negative": f"The image shows pattern {i + 1}, with dots.",
                    "tags_positive": ["stripes", f"p{i}"],
                    "tags_negative": ["dots"],
                    "source": "oracle",
                }
            sink.write({"__key__": key, ext: img, "txt": text, "json": meta})
            written.append({"key": key, "members": {ext: img.hex(), "txt": text, "json": meta}})
    json.dump(written, sys.stdout, ensure_ascii=False)


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "read":
        read(sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
