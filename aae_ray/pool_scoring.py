"""The score stage: the pool scored by the promoted model and the labeling queue written (`score_pool`), in this
process or with Ray Data (`score_pool_ray`).

In process, the whole pool is decoded into one float32 array (`dataset.pool_arrays`), which at 1e6 images of
64x64 is 16 GB. Ray Data reads the Parquet image table in blocks, decoded and scored in batches by a pool of
actors that each load the model artifact once, on a GPU when one is asked for; only one batch per actor is ever
decoded at a time. `score_pool` switches to it above a pool size, or for a cluster's --address.

The results equal in-process scoring (`artifacts.load(model_dir).score(pool_arrays(ws, size).X)`) to float
precision: the same artifact, the same preprocessing (`to_model_input` at the config's `input_size`), the same
Hotelling statistics, the same one pass (`Detector.score`) for every family. Arrays come back in the order of
the pool rows in images.parquet, which is `pool_arrays`' order, whatever order Ray Data finishes the batches in.

    scores = score_pool_ray(ws.images_path, ws.current_model_dir(), batch_size=512, num_gpus=0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aae_ray import artifacts
from aae_ray.cluster import connect, worker_device
from aae_ray.data.images import write_table_with
from aae_ray.dataset import pool_arrays
from aae_ray.queue import queue_order
from aae_ray.workspace import Workspace

POOL = "pool"
# `score` is the model family's primary score (T2 for the AAE), which ranks the queue and sets `anomaly`;
# `t2` is Hotelling's T2 of the latent code for every family.
SCORES_SCHEMA = pa.schema(
    [("id", pa.string()), ("t2", pa.float64()), ("p_value", pa.float64()), ("anomaly", pa.bool_()),
     ("rank", pa.int32()), ("score", pa.float64()), ("t2_local", pa.float64())]
)


# Decoded pool size above which scoring goes through Ray Data (batched actors; in process, the whole pool is
# decoded at once: 16 GB for a million 64x64 images). Below it, one process is faster (Ray Data costs ~5 s).
RAY_POOL_BYTES = 2 * 1024**3


def score_pool(ws: Workspace, *, round_no: int | None = None, policy: str = "highest", engine: str = "auto",
               num_gpus: float = 0.0, address: str | None = None) -> tuple[Path, pa.Table]:
    """Score the pool with the promoted model and write the labeling queue, rank 1 first, to
    `rounds/rNNN/scores.parquet` (the given round's, else the promoted model's). The policy orders the queue
    (aae_ray.queue): highest T2 first, diverse in latent space, or closest to the threshold. `engine`: "local"
    (this process), "ray" (Ray Data, aae_ray.pool_scoring; same scores, on the cluster at `address` if given),
    "onnx" (this process, the round's exported graph in ONNX Runtime) or "auto" (Ray with an `address` or above
    RAY_POOL_BYTES, else this process)."""
    if engine not in ("auto", "local", "ray", "onnx"):
        raise ValueError(f"engine must be auto, local, ray or onnx, got {engine!r}")
    model_dir = ws.current_model_dir()
    if engine == "onnx":  # this process, the scoring pass in ONNX Runtime (aae_ray.onnx_engine)
        from aae_ray import onnx_engine

        det = onnx_engine.load(ws, ws.current()["round"])
    else:
        det = artifacts.load(model_dir)
    size = det.config.input_size
    if address and engine in ("local", "onnx"):
        raise ValueError("an --address scores on a Ray cluster: use --engine ray or auto, or leave the address out")
    if engine == "auto" and address:
        engine = "ray"
    if engine == "auto":
        # Only the split column: reading the image bytes just to count would double the I/O of scoring.
        n_pool = pq.read_table(ws.images_path, columns=["split"]).column("split").to_pylist().count("pool")
        engine = "ray" if n_pool * size * size * 4 > RAY_POOL_BYTES else "local"
    if engine == "ray":
        ps = score_pool_ray(ws.images_path, model_dir, num_gpus=num_gpus, with_codes=policy == "diverse",
                            address=address)
        ids, t2, t2_local, score, p_value, anomaly = ps.ids, ps.t2, ps.t2_local, ps.score, ps.p_value, ps.anomaly
        codes = ps.codes
    else:
        pool = pool_arrays(ws, size)
        s = det.score(pool.X, maps=False)  # an empty pool gives empty scores
        ids, t2, t2_local, score, p_value, anomaly = pool.ids, s.t2, s.t2_local, s.score, s.p_value, s.anomaly
        codes = s.codes if policy == "diverse" else None
    order = queue_order(score, codes, det.threshold_, policy)
    rank = np.empty(len(t2), dtype=np.int32)
    rank[order] = np.arange(1, len(t2) + 1)
    table = pa.table({"id": ids, "t2": t2, "p_value": p_value, "anomaly": anomaly, "rank": rank, "score": score,
                      "t2_local": t2_local},
                     schema=SCORES_SCHEMA).take(order)
    path = ws.round_dir(ws.current()["round"] if round_no is None else round_no) / "scores.parquet"
    write_table_with(table, path, SCORES_SCHEMA)
    return path, table


@dataclass(frozen=True)
class PoolScores:
    ids: list[str]
    t2: np.ndarray  # float64 (N,)
    p_value: np.ndarray  # float64 (N,), of the primary score
    anomaly: np.ndarray  # bool (N,): score > the model's threshold
    codes: np.ndarray | None  # float32 (N, latent_dim) when asked for, else None
    score: np.ndarray  # float64 (N,): the primary score (aae_ray.detector)
    t2_local: np.ndarray  # float64 (N,): the image's local T2 score, NaN where the family has no local map

    def __len__(self) -> int:
        return len(self.ids)


class _Scorer:
    """One Ray Data actor: loads the artifact once, then scores batches of (id, PNG bytes) rows."""

    def __init__(self, model_dir: str, with_codes: bool = False):
        self.det = artifacts.load(Path(model_dir)).to(worker_device())
        self.with_codes = with_codes

    def __call__(self, batch: pa.Table) -> pa.Table:
        from aae_ray.data.images import to_model_input

        det = self.det
        X = to_model_input(batch.column("image").to_pylist(), det.config.input_size)
        s = det.score(X, maps=False)
        codes = s.codes
        columns = {"id": batch.column("id"), "t2": pa.array(s.t2, pa.float64()),
                   "p_value": pa.array(s.p_value, pa.float64()), "anomaly": pa.array(s.anomaly, pa.bool_()),
                   "score": pa.array(s.score, pa.float64()), "t2_local": pa.array(s.t2_local, pa.float64())}
        if self.with_codes:
            flat = pa.array(np.ascontiguousarray(codes, dtype=np.float32).reshape(-1), pa.float32())
            columns["codes"] = pa.FixedSizeListArray.from_arrays(flat, codes.shape[1])
        return pa.table(columns)


def score_pool_ray(images_path: Path, model_dir: Path, *, batch_size: int = 512, concurrency: int | None = None,
                   num_gpus: float = 0.0, with_codes: bool = False, address: str | None = None) -> PoolScores:
    """Score the `pool` rows of `images_path` with the artifact in `model_dir`, on `concurrency` actors (default:
    one a CPU, or one a `num_gpus` share of the cluster's GPUs), `batch_size` images a call. Joins the cluster at
    `address` (else RAY_ADDRESS; every node must see the workspace's path), or starts a local Ray, unless one is
    connected. Raises FileNotFoundError for a missing file or folder, ArtifactError for a broken model."""
    images_path, model_dir = Path(images_path), Path(model_dir)
    if not images_path.is_file():
        raise FileNotFoundError(f"no image table at {images_path}")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no model folder at {model_dir}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
    det = artifacts.load(model_dir)  # fail here, clearly, rather than in every actor's constructor
    latent_dim = det.config.latent_dim

    # The pool ids in file order (ids and splits only, no image bytes): the order of the result, and a check that
    # every pool row was scored exactly once.
    index = pq.read_table(images_path, columns=["id", "split"])
    pool_ids = index.filter(pc.equal(index.column("split"), POOL)).column("id")
    if len(pool_ids) == 0:
        return _empty(latent_dim, with_codes)

    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col, lit

    connect(address)
    resources = ray.cluster_resources()
    if concurrency is None:
        concurrency = _default_concurrency(resources, num_gpus)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    concurrency = min(concurrency, -(-len(pool_ids) // batch_size))  # no actor without a batch to score

    ds = (
        ray.data.read_parquet(str(images_path))
        .filter(expr=col("split") == lit(POOL))  # this and the projection are pushed down into the Parquet scan
        .select_columns(["id", "image"])
        # Reads cut blocks by file, row group and byte size, not rows: a pool of thousands of small PNGs can be one
        # block, i.e. one task for one actor. Blocks of a batch each (streaming, no shuffle) spread the actors' work.
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(
            _Scorer,
            fn_constructor_kwargs={"model_dir": str(model_dir), "with_codes": with_codes},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=concurrency),
            num_cpus=_actor_cpus(resources, concurrency),
            num_gpus=num_gpus or None,
            udf_modifying_row_count=False,
        )
    )
    ds.context.enable_progress_bars = False
    refs = ds.to_arrow_refs()
    result = pa.concat_tables(ray.get(refs)) if refs else None
    return _in_order(result, pool_ids, latent_dim, with_codes)


def _default_concurrency(resources: dict[str, float], num_gpus: float) -> int:
    if num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int(resources.get("CPU", 1)))


def _actor_cpus(resources: dict[str, float], concurrency: int) -> float:
    """CPUs each actor reserves: one, but never so many that the actors hold every CPU. The actor pool starts
    before the reads; actors holding all CPUs would leave the file listing and read tasks (1 CPU each) unscheduled
    and the dataset hung forever (seen with 2 actors on 2 CPUs). An actor still uses about one core."""
    spare = resources.get("CPU", 1.0) - 1.0
    return min(1.0, max(0.0, spare / concurrency))


def _in_order(result: pa.Table | None, pool_ids: pa.ChunkedArray, latent_dim: int, with_codes: bool) -> PoolScores:
    """The actors' rows rearranged into the pool's file order."""
    n_result = 0 if result is None else result.num_rows
    if n_result != len(pool_ids):
        raise RuntimeError(f"Ray Data returned {n_result} scores for {len(pool_ids)} pool images")
    where = pc.index_in(pool_ids, value_set=result.column("id"))
    if where.null_count:
        raise RuntimeError(f"Ray Data returned no score for {where.null_count} pool images")
    rows = result.take(where)
    codes = None
    if with_codes:
        codes = rows.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        codes = codes.astype(np.float32, copy=False).reshape(-1, latent_dim)
    return PoolScores(
        ids=rows.column("id").to_pylist(),
        t2=rows.column("t2").to_numpy().astype(np.float64, copy=False),
        p_value=rows.column("p_value").to_numpy().astype(np.float64, copy=False),
        anomaly=rows.column("anomaly").to_numpy(zero_copy_only=False).astype(bool, copy=False),
        codes=codes,
        score=rows.column("score").to_numpy().astype(np.float64, copy=False),
        t2_local=rows.column("t2_local").to_numpy(zero_copy_only=False).astype(np.float64, copy=False),
    )


def _empty(latent_dim: int, with_codes: bool) -> PoolScores:
    return PoolScores([], np.empty(0, np.float64), np.empty(0, np.float64), np.empty(0, bool),
                      np.empty((0, latent_dim), np.float32) if with_codes else None, np.empty(0, np.float64),
                      np.empty(0, np.float64))
