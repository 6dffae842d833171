"""``vitdense index``, ``vitdense search`` and ``vitdense retrieval-eval {revisited,knn,copy}``.

Commands parse options, call :mod:`vitdense.retrieval` / :mod:`vitdense.retrieval_eval`, print a summary
and write JSON + PNG files at the end (atomically). No algorithms here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from ..cli import OutputPath, build_extractor, extractor_options, main
from ..errors import ConfigError, DataError


# ---------------------------------------------------------------------------------- shared pieces

def descriptor_options(fn):
    """Options that define the global descriptor (stored in the index)."""
    opts = [
        click.option("--descriptor", type=click.Choice(["cls", "gem", "both"]), default="cls", show_default=True,
                     help="CLS token of the last layer, GeM-pooled patch tokens, or both concatenated."),
        click.option("--layer", type=int, default=-1, show_default=True,
                     help="Layer whose output tokens are pooled (-1 = last)."),
        click.option("--gem-p", type=float, default=4.0, show_default=True, help="GeM exponent (DINO: 4)."),
        click.option("--multiscale", is_flag=True, help="Average over the scales 1, 1/sqrt(2), 1/2 (DINO)."),
        click.option("--square", is_flag=True, help="Resize to LOAD_SIZE x LOAD_SIZE instead of keeping the "
                                                    "aspect ratio (DINO's copy detection)."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Images per forward pass."),
        click.option("--workers", type=int, default=2, show_default=True, help="DataLoader worker processes."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _extractor(opts: dict[str, Any]):
    """Extractor from the shared options; --stride unset means the patch size (the network as trained)."""
    stride = opts.get("stride")
    extractor = build_extractor(**{**opts, "stride": stride or 1})
    if not stride:
        extractor.stride = (extractor.p, extractor.p)  # stride 1 divides every patch size; now the real one
    return extractor


def _descriptor_config(opts: dict[str, Any], extractor) -> Any:
    from ..retrieval import DescriptorConfig

    return DescriptorConfig(descriptor=opts["descriptor"], layer=opts["layer"], gem_p=opts["gem_p"],
                            multiscale=opts["multiscale"], load_size=opts["load_size"] or None,
                            square=opts["square"], stride=extractor.stride[0], dtype=opts["dtype"])


def _check_loader(batch_size: int, workers: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be 0 or more")


def _thumb(path: str | Path, size: int = 256) -> np.ndarray:
    """A small RGB picture of an image file for contact sheets (grey when it cannot be read any more)."""
    from ..errors import ImageError
    from ..io import load_image

    try:
        im = load_image(path)
    except ImageError:
        return np.full((size, size, 3), 200, np.uint8)
    im.thumbnail((size, size))
    return np.asarray(im)


def _embed(extractor, items: Sequence, config, batch_size: int, workers: int, what: str):
    """Embeddings of items; DataError listing the first unreadable file when none can be read."""
    from ..retrieval import embed_images

    result = embed_images(extractor, items, config, batch_size, workers, desc=what)
    if len(result.indices) == 0:
        first = result.skipped[0] if result.skipped else (0, "no images")
        raise DataError(f"{what}: no image could be read ({items[first[0]]}: {first[1]})")
    for i, reason in result.skipped:
        click.echo(f"skipped {items[i]}: {reason}", err=True)
    return result


# ---------------------------------------------------------------------------------- index / search

def index_extractor(idx, index_dir: str | Path, model: str | None = None, weights: str | None = None,
                    device: str = "auto"):
    """The extractor an index's queries need: the index's own backbone (rebuilt from what it recorded) unless
    --model/--weights say otherwise, in the index's dtype and stride; ConfigError when it is another network.
    Used by ``vitdense search`` and ``vitdense serve``."""
    from ..retrieval import backbone_identity

    own = idx.backbone
    if model in (None, "auto") and weights is None:  # rebuild the index's backbone
        model, weights = own.get("model_arg"), own.get("weights")
        if weights is None and model in (None, "auto"):
            model = own["model"]  # what auto chose then, not what it would choose now
        if weights is not None and not Path(weights).is_file():
            raise DataError(f"{index_dir}: the index was built with --weights {weights}, which no longer exists; "
                            f"pass --weights with the same file")
    elif weights is None and model not in (own["model"], own.get("model_arg")):
        # another backbone is an error anyway: say so before loading it (a hub name could need the network)
        what = f"model '{own['model']}'" + (f" with --weights {own['weights']}" if own.get("weights") else "")
        raise ConfigError(f"{index_dir}: the index was built with {what}, not --model {model}; query with the "
                          f"index's backbone (leave out --model) or rebuild the index with this one into a new "
                          f"folder")
    extractor = _extractor(dict(model=model, weights=weights, device=device, dtype=idx.descriptor.dtype,
                                stride=idx.descriptor.stride))
    idx.check_backbone(backbone_identity(extractor, weights, model))
    return extractor


@main.command()
@click.argument("img_dir", type=click.Path(), required=False)
@click.option("--out", "out_dir", type=OutputPath(folder=True), required=True,
              help="Index folder (created; re-running updates it incrementally).")
@click.option("--embeddings", type=click.Path(file_okay=False), default=None,
              help="Build from the Parquet shards of `vitdense embed` instead of IMG_DIR (collections past one "
                   "machine: index chosen by --memory-budget, inverted lists on disk, resumable per shard).")
@click.option("--memory-budget", default="4G", show_default=True,
              help="--embeddings: RAM the build and the index's codes may use (e.g. 512M, 16G).")
@click.option("--index-type", type=click.Choice(["auto", "flat", "ivfflat", "ivfpq"]), default="auto",
              show_default=True, help="--embeddings: the faiss index (auto: from the count, dim and budget).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="--embeddings: add the shards in this process or as parallel Ray tasks.")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Include sub-folders.")
@click.option("--compressed", is_flag=True, help="IVF-PQ index (for collections too large for memory).")
@click.option("--nlist", type=int, default=None, help="IVF cells (default 4*sqrt(N)).")
@click.option("--pq-m", type=int, default=None, help="PQ bytes per vector (default dim/4; must divide dim).")
@click.option("--nprobe", type=int, default=32, show_default=True, help="IVF cells visited per query.")
@click.option("--rerank", type=int, default=100, show_default=True,
              help="IVF-PQ candidates re-scored exactly from the stored vectors (0 = off).")
@descriptor_options
@extractor_options(stride=None, layer=None, facet=None, load_size=224)
def index(img_dir: str | None, out_dir: str, embeddings: str | None, memory_budget: str, index_type: str,
          engine: str, recursive: bool, compressed: bool, nlist: int | None, pq_m: int | None,
          nprobe: int, rerank: int, **opts: Any) -> None:
    """Embed the images of IMG_DIR into a searchable index folder (only new or changed files on re-runs),
    or with --embeddings build a faiss index from the shards of `vitdense embed`."""
    from ..io import list_images

    if (img_dir is None) == (embeddings is None):
        raise ConfigError("give either IMG_DIR or --embeddings EMB (not both)")
    if embeddings is not None:
        from ..collection.index import build_index

        meta = build_index(embeddings, out_dir, memory_budget, index_type, nlist,
                           nprobe if nprobe != 32 else None, rerank, engine)
        sec, rec = meta["stages"]["seconds"], meta["recall"]
        click.echo(f"index {out_dir}: {meta['count']} vector(s), dim {meta['dim']}, {meta['choice']['factory']} "
                   f"({meta['choice']['reason']}); shards added {len(meta['stages']['shards_added'])} of "
                   f"{len(meta['shards'])}; train {sec['train']:.1f}s add {sec['add']:.1f}s merge "
                   f"{sec['merge']:.1f}s; peak RSS {meta['peak_rss'] / 2**20:.0f} MiB; recall@10 "
                   f"{rec['recall_at_10']:.3f}, re-ranked {rec['recall_at_10_reranked']:.3f}")
        return
    from ..retrieval import FaissConfig, update_index  # imports torch, which the --embeddings build never needs

    _check_loader(opts["batch_size"], opts["workers"])
    paths = list_images(img_dir, recursive=recursive)
    extractor = _extractor(opts)
    config = _descriptor_config(opts, extractor)
    faiss_config = FaissConfig("ivfpq" if compressed else "flat", nlist, pq_m, 8, nprobe, rerank)
    result, plan = update_index(out_dir, paths, extractor, config, faiss_config, weights=opts["weights"],
                                model_arg=opts["model"], batch_size=opts["batch_size"],
                                num_workers=opts["workers"], source=img_dir)
    for item in result.skipped:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    click.echo(f"index {out_dir}: {len(result.entries)} image(s), dim {result.vectors.shape[1]}, "
               f"{result.faiss_config.kind}; embedded {len(plan.embed) - len(result.skipped)} "
               f"(changed {len(plan.changed)}), reused {len(plan.keep)}, removed {len(plan.removed)}, "
               f"skipped {len(result.skipped)}")


@main.command()
@click.argument("queries", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_dir", type=click.Path(file_okay=False), required=True, help="Index folder.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Results per query.")
@click.option("--out", "out_dir", type=OutputPath(folder=True), default="search_out", show_default=True,
              help="Folder for results.json and one contact sheet per query.")
@click.option("--model", default=None, help="Backbone (default: the one the index was built with; another is an "
                                          "error).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Weights file (default: the one the index was built with).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Precision of the forward pass (default: the index's; another one is an error).")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
def search(queries: tuple[str, ...], index_dir: str, k: int, out_dir: str, model: str | None,
           weights: str | None, device: str, dtype: str | None, workers: int) -> None:
    """Find the K images of an index most similar to each QUERY image (files or folders).

    Queries are embedded with the index's descriptor settings; a backbone other than the index's is an
    error.
    """
    from ..collection.index import open_index
    from ..io import expand_inputs, record_path, replace_outputs, save_json, save_png, write_outputs
    from ..viz import contact_sheet

    if k < 1:
        raise ConfigError(f"-k {k}: must be at least 1")
    _check_loader(8, workers)
    idx = open_index(index_dir)
    if idx.index is None:
        raise DataError(f"{index_dir}: the index is incomplete (an indexing run was interrupted); re-run "
                        f"`vitdense index` to finish it")
    if dtype is not None and dtype != idx.descriptor.dtype:
        raise ConfigError(f"{index_dir}: the index was embedded with --dtype {idx.descriptor.dtype}, queries "
                          f"must be too (got --dtype {dtype})")
    paths = expand_inputs(queries)
    extractor = index_extractor(idx, index_dir, model, weights, device)
    result = _embed(extractor, paths, idx.descriptor, 8, workers, "queries")
    scores, ids = idx.search(result.vectors, k)
    records, writers = [], []
    out = Path(out_dir)
    for row, qi in enumerate(result.indices):
        qpath = paths[qi]
        names = idx.ids(ids[row])
        hits = [{"rank": r + 1, "path": name, "score": float(s)}
                for r, (s, name) in enumerate(zip(scores[row], names)) if name is not None]
        records.append({"query": record_path(qpath), "results": hits})
        click.echo(f"{qpath}")
        for hit in hits:
            click.echo(f"  {hit['rank']:3d}  {hit['score']:.4f}  {hit['path']}")
        sheet = contact_sheet([_thumb(qpath)] + [_thumb(h["path"]) for h in hits],
                              ["query: " + qpath.name] + [f"{h['rank']}: {h['score']:.3f} {Path(h['path']).name}"
                                                          for h in hits], cols=min(6, len(hits) + 1))
        name = f"{row:03d}_{qpath.stem}_results.png"
        writers.append(lambda sheet=sheet, name=name: save_png(out / name, sheet))
    report = {"index": str(Path(index_dir).resolve()), "k": k, "descriptor": idx.descriptor.to_dict(),
              "weights_used": extractor.weights_used,
              "queries": records, "skipped": [{"path": record_path(paths[i]), "reason": r} for i, r in result.skipped]}
    write_outputs(writers + [lambda: save_json(out / "results.json", report)])
    replace_outputs(out, [f"{row:03d}_{paths[qi].stem}_results.png" for row, qi in enumerate(result.indices)]
                    + ["results.json"])
    click.echo(f"wrote {out / 'results.json'} and {len(records)} contact sheet(s)")


# ---------------------------------------------------------------------------------- evaluations

@main.group("retrieval-eval")
def retrieval_eval() -> None:
    """Standard retrieval evaluations: Revisited Oxford/Paris, k-NN classification, copy detection."""


@retrieval_eval.command("revisited")
@click.argument("dataset_dir", type=click.Path(file_okay=False))
@click.option("--gnd", "gnd_file", type=click.Path(dir_okay=False), default=None,
              help="Ground truth (gnd_roxford5k.pkl / gnd_rparis6k.pkl of revisitop, or the same as JSON); "
                   "default: the one gnd_*.pkl in DATASET_DIR.")
@click.option("--ext", default=".jpg", show_default=True, help="File suffix of the images.")
@click.option("--crop-queries/--no-crop-queries", default=True, show_default=True,
              help="Crop queries to their bounding box (revisitop protocol; DINO's script does not).")
@click.option("--out", "out_dir", type=OutputPath(folder=True), default="revisited_out", show_default=True)
@descriptor_options
@extractor_options(stride=None, layer=None, facet=None, load_size=224)
def eval_revisited(dataset_dir: str, gnd_file: str | None, ext: str, crop_queries: bool, out_dir: str,
                   **opts: Any) -> None:
    """mAP (Easy / Medium / Hard) on Revisited Oxford or Paris.

    DATASET_DIR is revisitop's data-set folder (e.g. roxford5k/, holding gnd_roxford5k.pkl and jpg/) or the
    folder of the images themselves (then give --gnd).
    """
    from ..io import load_image, record_path, save_json, save_png, write_outputs
    from ..retrieval_eval import load_revisited_gnd, ranks_from_similarity, revisited_map
    from ..viz import contact_sheet

    _check_loader(opts["batch_size"], opts["workers"])
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data-set folder not found")
    if gnd_file is None:
        found = sorted(root.glob("gnd_*.pkl"))
        if len(found) != 1:
            raise DataError(f"{root}: {'no' if not found else 'more than one'} gnd_*.pkl ground-truth file "
                            f"here; pass --gnd")
        gnd_file = str(found[0])
    cfg = load_revisited_gnd(gnd_file)
    folder = root / "jpg" if (root / "jpg").is_dir() else root  # revisitop keeps the images in jpg/
    db_paths = [folder / f"{name}{ext}" for name in cfg["imlist"]]
    q_paths = [folder / f"{name}{ext}" for name in cfg["qimlist"]]
    missing = [p for p in db_paths + q_paths if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: image listed in {gnd_file} not found ({len(missing)} missing)")
    extractor = _extractor(opts)
    config = _descriptor_config(opts, extractor)
    queries: list = q_paths
    if crop_queries:
        queries = []
        for path, g in zip(q_paths, cfg["gnd"]):
            im = load_image(path)
            queries.append(im.crop(tuple(int(round(v)) for v in g["bbx"])) if "bbx" in g else im)
    db = _embed(extractor, db_paths, config, opts["batch_size"], opts["workers"], "database")
    qs = _embed(extractor, queries, config, opts["batch_size"], opts["workers"], "queries")
    for res, items in ((db, db_paths), (qs, q_paths)):
        if res.skipped:
            i, reason = res.skipped[0]
            raise DataError(f"{items[i]}: {reason} ({len(res.skipped)} unreadable); the protocol needs every "
                            f"image")
    ranks = ranks_from_similarity(qs.vectors @ db.vectors.T)  # (N, Q)
    results = revisited_map(ranks, cfg["gnd"])
    report: dict[str, Any] = {"gnd": record_path(gnd_file), "descriptor": config.to_dict(), "crop_queries": crop_queries,
                              "weights_used": extractor.weights_used}
    for setup, res in results.items():
        report[setup] = {"mAP": res.map * 100, "mP@k": dict(zip(map(str, res.kappas), res.mp_at_k * 100)),
                         "AP": (res.aps * 100).tolist()}
        click.echo(f"{setup:>6}: mAP {res.map * 100:6.2f}  mP@{list(res.kappas)} "
                   f"{np.round(res.mp_at_k * 100, 2).tolist()}")
    # a look at the first queries: the query, then its top 5 (titles say positive / junk / negative, Medium)
    thumbs, titles = [], []
    for q in range(min(4, len(q_paths))):
        g = cfg["gnd"][q]
        ok, junk = set(np.r_[g.get("easy", []), g.get("hard", [])].astype(int)), set(np.asarray(g.get("junk", []), int))
        thumbs.append(np.asarray(queries[q]) if crop_queries else _thumb(q_paths[q]))
        titles.append(f"query {cfg['qimlist'][q]}")
        for j in ranks[:5, q]:
            thumbs.append(_thumb(db_paths[j]))
            titles.append("positive" if j in ok else "junk" if j in junk else "negative")
    out = Path(out_dir)
    write_outputs([lambda: save_json(out / "revisited.json", report),
                   lambda: save_png(out / "revisited_top5.png", contact_sheet(thumbs, titles, cols=6))])
    click.echo(f"wrote {out / 'revisited.json'} and {out / 'revisited_top5.png'}")


def _labelled_folder(folder: str, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Images of a class-per-sub-folder tree (ImageFolder layout) → paths, labels, class names."""
    from ..io import list_images

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subdirs:
        raise DataError(f"{root}: expected one sub-folder of images per class")
    names = classes or [d.name for d in subdirs]
    paths, labels = [], []
    for d in subdirs:
        if d.name not in names:
            raise DataError(f"{d}: class '{d.name}' does not exist in the training folder")
        try:
            images = list_images(d, recursive=True)
        except DataError:
            continue
        paths += images
        labels += [names.index(d.name)] * len(images)
    if not paths:
        raise DataError(f"{root}: no images in its class sub-folders")
    return paths, labels, names


@retrieval_eval.command("knn")
@click.argument("train_dir", type=click.Path(file_okay=False))
@click.argument("val_dir", type=click.Path(file_okay=False))
@click.option("-k", "k", type=int, default=20, show_default=True, help="Neighbours (DINO: 20).")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Vote temperature (DINO: 0.07).")
@click.option("--out", "out_dir", type=OutputPath(folder=True), default="knn_out", show_default=True)
@descriptor_options
@extractor_options(stride=None, layer=None, facet=None, load_size=224)
def eval_knn(train_dir: str, val_dir: str, k: int, temperature: float, out_dir: str, **opts: Any) -> None:
    """Weighted k-NN accuracy: TRAIN_DIR and VAL_DIR hold one sub-folder of images per class."""
    import torch

    from ..io import save_json, save_png, write_outputs
    from ..metrics import top5_accuracy
    from ..retrieval_eval import knn_classify
    from ..viz import confusion_picture

    if k < 1 or temperature <= 0:
        raise ConfigError(f"-k {k} / --temperature {temperature}: need k >= 1 and a positive temperature")
    _check_loader(opts["batch_size"], opts["workers"])
    train_paths, train_labels, classes = _labelled_folder(train_dir)
    val_paths, val_labels, _ = _labelled_folder(val_dir, classes)
    extractor = _extractor(opts)
    config = _descriptor_config(opts, extractor)
    tr = _embed(extractor, train_paths, config, opts["batch_size"], opts["workers"], "train")
    va = _embed(extractor, val_paths, config, opts["batch_size"], opts["workers"], "val")
    ytr = torch.tensor(np.asarray(train_labels)[tr.indices])
    yva = torch.tensor(np.asarray(val_labels)[va.indices])
    votes, pred = knn_classify(torch.from_numpy(tr.vectors), ytr, torch.from_numpy(va.vectors), k, temperature,
                               len(classes))
    top1 = (pred == yva).float().mean().item() * 100
    top5 = top5_accuracy(votes, yva)  # None with 5 classes or fewer (100 % by construction): left out
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, (yva.numpy(), pred.numpy()), 1)
    report = {"top1": top1, **({"top5": top5} if top5 is not None else {}), "k": k, "temperature": temperature,
              "classes": classes, "confusion": confusion, "train": len(tr.indices), "val": len(va.indices),
              "descriptor": config.to_dict(), "weights_used": extractor.weights_used}
    top5_text = f"  top-5 {top5:.2f}%" if top5 is not None else ""
    click.echo(f"k-NN (k={k}, T={temperature}): top-1 {top1:.2f}%{top5_text}  "
               f"({len(va.indices)} val / {len(tr.indices)} train images, {len(classes)} classes)")
    out = Path(out_dir)
    write_outputs([lambda: save_json(out / "knn.json", report),
                   lambda: save_png(out / "knn_confusion.png", confusion_picture(confusion, classes))])
    click.echo(f"wrote {out / 'knn.json'} and {out / 'knn_confusion.png'}")


@retrieval_eval.command("copy")
@click.argument("img_dir", type=click.Path(file_okay=False))
@click.option("--copies", type=int, default=2, show_default=True, help="Augmented copies per image.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Geometric/degradation strength (1: crop to 50%% area, rotate 10 deg, blur, noise, JPEG).")
@click.option("--color", type=float, default=1.0, show_default=True,
              help="Photometric strength (1: brightness/contrast/saturation x[0.6, 1.4]).")
@click.option("--distractors", type=click.Path(file_okay=False), default=None,
              help="Folder of extra database images that are nobody's source.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-k", "k", type=int, default=20, show_default=True, help="Results scored per query (DINO: 20).")
@click.option("--out", "out_dir", type=OutputPath(folder=True), default="copy_out", show_default=True)
@descriptor_options
@extractor_options(stride=None, layer=None, facet=None, load_size=224)
def eval_copy(img_dir: str, copies: int, strength: float, color: float, distractors: str | None, seed: int,
              k: int, out_dir: str, **opts: Any) -> None:
    """Copy detection: augmented copies of the IMG_DIR images must find their source (top-1, mAP)."""
    from ..io import list_images, load_images, record_path, save_json, save_png, write_outputs
    from ..retrieval import faiss_search, build_faiss, FaissConfig
    from ..retrieval_eval import copy_detection_scores, strong_augment
    from ..viz import contact_sheet

    if copies < 1 or k < 1:
        raise ConfigError(f"--copies {copies} / -k {k}: both must be at least 1")
    _check_loader(opts["batch_size"], opts["workers"])
    good, images, skipped = load_images(list_images(img_dir, recursive=True))
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    if not images:
        raise DataError(f"{img_dir}: no readable image")
    rng = np.random.default_rng(seed)
    queries = [strong_augment(im, rng, strength, color) for im in images for _ in range(copies)]
    sources = [i for i in range(len(images)) for _ in range(copies)]
    extractor = _extractor(opts)
    config = _descriptor_config(opts, extractor)
    db = _embed(extractor, images, config, opts["batch_size"], opts["workers"], "originals").vectors
    db_paths = [record_path(p) for p in good]
    if distractors:
        dpaths = list_images(distractors, recursive=True)
        dres = _embed(extractor, dpaths, config, opts["batch_size"], opts["workers"], "distractors")
        db = np.concatenate([db, dres.vectors])
        db_paths += [record_path(dpaths[i]) for i in dres.indices]
    qv = _embed(extractor, queries, config, opts["batch_size"], opts["workers"], "copies").vectors
    scores, ids = faiss_search(build_faiss(db, FaissConfig("flat")), qv, k)
    res = copy_detection_scores(ids, [[s] for s in sources])
    report = {"top1": res.top1, "mAP": res.map, "queries": len(queries), "database": len(db_paths),
              "strength": strength, "color": color, "seed": seed, "descriptor": config.to_dict(),
              "weights_used": extractor.weights_used,
              "per_query": [{"source": db_paths[s], "first_hit_rank": int(f) + 1 if f >= 0 else None,
                             "top1": db_paths[ids[q, 0]], "score": float(scores[q, 0])}
                            for q, (s, f) in enumerate(zip(sources, res.first_hit))]}
    click.echo(f"copy detection: top-1 {res.top1 * 100:.2f}%  mAP {res.map * 100:.2f}%  "
               f"({len(queries)} copies, database of {len(db_paths)})")
    shown = list(range(min(8, len(queries))))
    thumbs, titles = [], []
    for q in shown:
        thumbs += [np.asarray(queries[q]), _thumb(db_paths[ids[q, 0]])]
        titles += [f"copy of {Path(db_paths[sources[q]]).name}",
                   ("OK " if ids[q, 0] == sources[q] else "WRONG ") + f"{scores[q, 0]:.3f}"]
    out = Path(out_dir)
    write_outputs([lambda: save_json(out / "copy_detection.json", report),
                   lambda: save_png(out / "copy_detection.png", contact_sheet(thumbs, titles, cols=4))])
    click.echo(f"wrote {out / 'copy_detection.json'} and {out / 'copy_detection.png'}")
