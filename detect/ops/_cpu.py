"""Fused CPU loops (numba) behind the box kernels: IoU, greedy NMS, the box coder and clipping.

Each loop computes, element by element, exactly the operations the torch-op reference performs on whole tensors,
in the same order and in the same precision, so its results are bitwise equal to the reference's. Nothing here
is public: :mod:`detect.ops.dispatch` decides when a loop runs, and the op modules (:mod:`detect.ops.boxes`,
:mod:`detect.ops.nms`, :mod:`detect.ops.coder`) convert tensors to the arrays these loops take.

Decisions:

- No ``fastmath`` (it would let LLVM reassociate, contract into FMA and assume no NaN) and ``error_model="numpy"``
  (a float division by zero gives inf/NaN instead of a Python exception check in the inner loop, which would
  block vectorisation).
- Python float literals are never mixed with array values: numba would promote ``float32 op 0.5`` to float64.
  Every constant a loop needs (``zero``, ``half``, ``tiny``, the coder's weights) arrives as an argument of the
  array's own dtype, built by the caller with ``dtype.type(value)``.
- Minimum and maximum are written as comparisons (``b if b < a else a``), which LLVM turns into vector selects.
  For the IoU matrix they agree with ``torch.minimum``/``maximum`` on every NaN-free input, and a NaN coordinate
  still gives NaN (its box's area is NaN). For NMS they reproduce torchvision's ``std::max``/``std::min``
  argument order exactly, NaN included.
- Every loop takes a ``[start, stop)`` range of its independent tasks (rows, images, boxes) and releases the GIL
  (``nogil``): :func:`detect.ops.dispatch.run_cpu` runs small inputs as one range in the calling thread and
  splits large ones over a few Python threads. numba's own ``parallel=True`` was measured slower: its OpenMP pool
  is a second one beside torch's, and on a busy 2-core machine each pool's spinning workers starve the other
  (multi-class NMS: 2.0 ms serial, 8.0 ms with ``prange``, 16 ms right after a torch op; IoU 4,000 x 4,000:
  25 ms serial, 32 ms with ``prange``). Threads blocked on a queue do not spin, and the threading layer's
  thread- and fork-safety questions do not arise. The one-pass decode goes further and runs on torch's own
  OpenMP team (see its section): after a torch op, torch's spinning worker still held the second core that a
  Python thread needed.
- ``cache=True`` everywhere. When no cache location is writable (a read-only install with an unwritable home and
  no ``NUMBA_CACHE_DIR``), numba refuses to create a cached function; :func:`_jit` then compiles without a cache
  instead of failing the import.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = [
    "DECODE_BLOCK", "TORCH_EXP", "clip", "decode", "decode_finish", "decode_prepare", "encode_finish", "encode_prepare",
    "iou", "multiclass", "nms",
]


def _jit(fn):
    """``numba.njit`` with this module's options, cached on disk when a cache location is writable."""
    options = dict(nogil=True, error_model="numpy", fastmath=False)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, **options)(fn)


# --- IoU ------------------------------------------------------------------------------------------------------


@_jit
def iou(start, stop, out, first, second, zero, tiny):
    """Rows ``task = image * N + row`` in ``[start, stop)`` of ``out (B, N, M)``: IoU of ``first (B, N, 4)``
    against the columns ``second (B, 5, M)`` (x1, y1, x2, y2, area as a structure of arrays, so the inner loop
    vectorises). Operation order as :mod:`detect.ops.boxes` documents: ``w = min(x2) - max(x1)`` clamped at 0,
    the same for ``h``, ``inter = w * h``, ``union = (area_a + area_b) - inter`` clamped at ``tiny``,
    ``inter / union``."""
    rows = first.shape[1]
    for task in range(start, stop):
        image, row = task // rows, task % rows
        ax1, ay1, ax2, ay2 = first[image, row, 0], first[image, row, 1], first[image, row, 2], first[image, row, 3]
        area_a = (ax2 - ax1) * (ay2 - ay1)
        bx1, by1, bx2, by2 = second[image, 0], second[image, 1], second[image, 2], second[image, 3]
        area_b = second[image, 4]
        dest = out[image, row]
        for j in range(dest.shape[0]):
            w = (bx2[j] if bx2[j] < ax2 else ax2) - (bx1[j] if bx1[j] > ax1 else ax1)
            h = (by2[j] if by2[j] < ay2 else ay2) - (by1[j] if by1[j] > ay1 else ay1)
            if w < zero:
                w = zero
            if h < zero:
                h = zero
            inter = w * h
            union = (area_a + area_b[j]) - inter
            if union < tiny:
                union = tiny
            dest[j] = inter / union


# --- greedy NMS -----------------------------------------------------------------------------------------------


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _suppressed(cx1, cy1, cx2, cy2, area_c, kept_boxes, first, last, threshold, zero):
    """Whether a kept box ``kept_boxes[:, first:last]`` (x1, y1, x2, y2, area) overlaps the candidate with IoU
    above ``threshold``, in torchvision's CPU kernel arithmetic with the kept box as its first operand.

    ``xx1 = std::max(kx1, cx1)`` is ``cx1 if kx1 < cx1 else kx1``, ``std::min(kx2, cx2)`` is ``cx2 if cx2 <
    kx2 else kx2``, ``w = std::max(0, xx2 - xx1)`` is ``w if 0 < w else 0`` (NaN -> 0), ``iou = inter /
    (area_k + area_c - inter)`` in the boxes' dtype, compared with the float64 ``threshold`` in float64.
    """
    for q in range(first, last):
        kx1, ky1, kx2, ky2 = kept_boxes[0, q], kept_boxes[1, q], kept_boxes[2, q], kept_boxes[3, q]
        w = (cx2 if cx2 < kx2 else kx2) - (cx1 if kx1 < cx1 else kx1)
        h = (cy2 if cy2 < ky2 else ky2) - (cy1 if ky1 < cy1 else ky1)
        w = w if zero < w else zero
        h = h if zero < h else zero
        inter = w * h
        if inter / ((kept_boxes[4, q] + area_c) - inter) > threshold:
            return True
    return False


@_jit
def nms(start, stop, boxes, order, segment, image_start, segment_start, threshold, cap, kept_boxes, fill, keep,
        counts, zero):
    """Greedy NMS of images ``[start, stop)``, torchvision's CPU kernel decision for decision.

    Image ``b``'s candidates are ``order[image_start[b]:image_start[b + 1]]`` (indices into ``boxes``), in
    visiting order (score descending, index ascending). A candidate is kept unless an already kept box of its
    segment (same image and group) overlaps it (:func:`_suppressed`). Kept boxes of segment ``s`` are appended
    to ``kept_boxes[:, segment_start[s]:]``, so a candidate meets its own segment's kept boxes only. An image
    stops at ``cap`` kept boxes (``cap < 0``: no cap). ``keep[p]`` marks kept visiting positions, ``counts[b]``
    their number.
    """
    for image in range(start, stop):
        kept = 0
        for p in range(image_start[image], image_start[image + 1]):
            if kept == cap:
                break
            i = order[p]
            cx1, cy1, cx2, cy2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            area_c = (cx2 - cx1) * (cy2 - cy1)
            s = segment[i]
            first = segment_start[s]
            if not _suppressed(cx1, cy1, cx2, cy2, area_c, kept_boxes, first, first + fill[s], threshold, zero):
                slot = first + fill[s]
                kept_boxes[0, slot], kept_boxes[1, slot] = cx1, cy1
                kept_boxes[2, slot], kept_boxes[3, slot] = cx2, cy2
                kept_boxes[4, slot] = area_c
                fill[s] += 1
                keep[p] = True
                kept += 1
        counts[image] = kept


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _visited_before(scores, base, a, b):
    """Whether candidate ``a`` comes before ``b``: higher score, or equal score (``-0.0 == 0.0``) and lower
    index."""
    score_a, score_b = scores[base + a], scores[base + b]
    return score_a > score_b or (score_a == score_b and a < b)


@numba.njit(nogil=True, error_model="numpy")
def _sift_down(heap, size, pos, scores, base):
    """Restore the heap order of ``heap[:size]`` below ``pos`` (the first to visit on top)."""
    item = heap[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _visited_before(scores, base, heap[child + 1], heap[child]):
            child += 1
        if not _visited_before(scores, base, heap[child], item):
            break
        heap[pos] = heap[child]
        pos = child
    heap[pos] = item


@_jit
def multiclass(start, stop, scores, boxes, row_start, classes, class_specific, score_threshold, iou_threshold, topk,
               cap, out_boxes, out_scores, out_labels, out_rows, counts, zero):
    """:func:`detect.ops.nms.multiclass_nms` for images ``[start, stop)``, from scores to kept detections.

    Image ``b``'s ``(row, class)`` pairs are ``t = row * classes + class`` over its rows ``row_start[b] ..
    row_start[b + 1]``. Candidates (``score > score_threshold`` in the scores' dtype, as torch compares a tensor
    with a Python number) are visited by score descending, then ``t`` ascending (``-0.0`` and ``0.0`` tie, as in
    :func:`detect.ops.nms._score_order`), popped one by one from a binary heap: with a per-image cap most
    candidates are never visited, and building the heap costs ``O(n)`` against a full sort's ``O(n log n)``. A candidate past the
    ``topk``-th visited of its class is skipped (the per-class top-k comes before NMS; ``topk < 0``: none);
    otherwise it is kept unless a kept box of its class overlaps it (:func:`_suppressed`). The image stops at
    ``cap`` kept detections (``cap < 0``: no cap); kept ones go, in visiting order, to ``out_*[b]``.
    """
    for image in range(start, stop):
        first_row = row_start[image]
        total = (row_start[image + 1] - first_row) * classes
        base = first_row * classes
        candidates = np.empty(total, dtype=np.int64)
        found = 0
        for t in range(total):
            if scores[base + t] > score_threshold:
                candidates[found] = t
                found += 1
        class_start = np.zeros(classes + 1, dtype=np.int64)
        for f in range(found):
            class_start[candidates[f] % classes + 1] += 1
        for c in range(classes):  # counts -> first kept slot of each class
            class_start[c + 1] += class_start[c]
        for pos in range(found // 2 - 1, -1, -1):  # a heap of the candidates, first to visit on top
            _sift_down(candidates, found, pos, scores, base)
        fill = np.zeros(classes, dtype=np.int64)
        visited = np.zeros(classes, dtype=np.int64)
        kept_boxes = np.empty((5, found), dtype=boxes.dtype)
        kept = 0
        remaining = found
        while remaining > 0:
            if kept == cap:
                break
            t = candidates[0]  # pop the next candidate to visit
            remaining -= 1
            candidates[0] = candidates[remaining]
            _sift_down(candidates, remaining, 0, scores, base)
            c = t % classes
            if topk >= 0:
                if visited[c] >= topk:
                    continue
                visited[c] += 1
            row = t // classes
            b = base + t if class_specific else first_row + row
            cx1, cy1, cx2, cy2 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
            area_c = (cx2 - cx1) * (cy2 - cy1)
            first = class_start[c]
            if not _suppressed(cx1, cy1, cx2, cy2, area_c, kept_boxes, first, first + fill[c], iou_threshold, zero):
                slot = first + fill[c]
                kept_boxes[0, slot], kept_boxes[1, slot] = cx1, cy1
                kept_boxes[2, slot], kept_boxes[3, slot] = cx2, cy2
                kept_boxes[4, slot] = area_c
                fill[c] += 1
                out_boxes[image, kept, 0], out_boxes[image, kept, 1] = cx1, cy1
                out_boxes[image, kept, 2], out_boxes[image, kept, 3] = cx2, cy2
                out_scores[image, kept] = scores[base + t]
                out_labels[image, kept] = c
                out_rows[image, kept] = row
                kept += 1
        counts[image] = kept


# --- box coder ------------------------------------------------------------------------------------------------
#
# One-pass float32 decode. torch's CPU exp on a contiguous float32 tensor is MKL's ``vmsExp`` in high-accuracy
# mode (x86 builds of torch link MKL; ATEN_CPU_CAPABILITY does not change it), applied to each thread's chunk; its
# results are not libm's ``expf`` nor Sleef's (about 1 % of inputs differ in the last bit from either), but they
# depend on nothing but the input value: verified over all 2^32 float32 inputs, called on blocks of random
# lengths at random offsets (the sweep the closing note of issue 24 names). :func:`decode` calls that same function,
# found in ``libtorch_cpu``, on a small block of the scaled ``dw, dh`` that lives in the L1 cache, so it reads the
# deltas and boxes from memory once and writes the result once, and its exponentials are torch's bit for bit.
# Where torch has no MKL (``TORCH_EXP`` is None: ARM, macOS builds) the coder keeps the two-pass path below,
# which applies torch.exp itself.
#
# MKL threads its vector functions itself, up to ``mkl_get_max_threads()``, and torch.set_num_threads(N) sets that
# (torch's own calls run inside its parallel regions, where MKL stays on one thread). Once anything in the
# process had called it (``detect.ops.threads.one_thread`` does, restoring the count after every resize and box
# head), each of the decode's 512-element calls woke an MKL thread team: the 336,000-row decode took 3 to 100 ms
# instead of 1 ms on the 2-core machine. :func:`decode` therefore sets MKL's count for the calling thread to one
# (``MKL_Set_Num_Threads_Local``) for its duration and restores it after.

_TORCH_EXP_SYMBOL = "detect_ops_torch_vms_exp"
_MKL_LOCAL_SYMBOL = "detect_ops_mkl_set_num_threads_local"
_VML_MODE = 0x2 | 0x140000 | 0x100  # VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE: the mode torch's vml.h passes
DECODE_BLOCK = 512
"""Rows per block of :func:`decode`: its six per-row arrays (12 KiB) and the block's deltas and corners (8 KiB each)
stay in L1."""


def _find_torch_exp() -> tuple[int, int] | None:
    """The addresses of MKL's ``vmsExp`` and ``MKL_Set_Num_Threads_Local`` inside the loaded ``libtorch_cpu``, or
    None: torch built without MKL, or a torch whose exp is no longer that function. The check: 65,536 float32
    values spread over the decode's range of exponents, through both (about 1 % of them tell MKL's results from
    libm's or Sleef's)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        vms_exp = lib.vmsExp
        local_threads = lib.MKL_Set_Num_Threads_Local  # the C interface (int by value)
    except (OSError, AttributeError):
        return None
    vms_exp.restype = None
    vms_exp.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    probe = np.linspace(-110.0, 5.0, 1 << 16, dtype=np.float32)
    ours = np.empty_like(probe)
    vms_exp(len(probe), probe.ctypes.data, ours.ctypes.data, _VML_MODE)
    if not np.array_equal(ours.view(np.uint32), torch.exp(torch.from_numpy(probe)).numpy().view(np.uint32)):
        return None
    return ctypes.cast(vms_exp, ctypes.c_void_p).value, ctypes.cast(local_threads, ctypes.c_void_p).value


_FOUND = _find_torch_exp()
TORCH_EXP = _FOUND[0] if _FOUND else None
"""Address of the exp torch's CPU kernel runs on float32 (MKL ``vmsExp``), or None; registered for the JIT as
``detect_ops_torch_vms_exp`` (and MKL's per-thread thread count beside it)."""
if _FOUND is not None:
    llvm_binding.add_symbol(_TORCH_EXP_SYMBOL, _FOUND[0])
    llvm_binding.add_symbol(_MKL_LOCAL_SYMBOL, _FOUND[1])


@intrinsic
def _mkl_local_threads(typingctx, count):
    """``MKL_Set_Num_Threads_Local(count)``: MKL's thread count for the calling thread (0: back to the global
    one); returns the previous local count."""
    sig = types.int64(count)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(i32, [i32])
        fn = builder.module.globals.get(_MKL_LOCAL_SYMBOL) or ir.Function(builder.module, fnty, _MKL_LOCAL_SYMBOL)
        value = context.cast(builder, args[0], signature.args[0], types.int32)
        return builder.sext(builder.call(fn, [value]), ir.IntType(64))

    return sig, codegen


@intrinsic
def _torch_exp(typingctx, n, src, dst):
    """``dst[:n] = exp(src[:n])`` (float32 arrays, may alias) through MKL's ``vmsExp``, as torch computes it."""
    sig = types.void(types.int64, src, dst)

    def codegen(context, builder, signature, args):
        count, source, dest = args
        float_ptr = ir.PointerType(ir.FloatType())
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64), float_ptr, float_ptr, ir.IntType(64)])
        fn = builder.module.globals.get(_TORCH_EXP_SYMBOL) or ir.Function(builder.module, fnty, _TORCH_EXP_SYMBOL)
        src_data = context.make_array(signature.args[1])(context, builder, source).data
        dst_data = context.make_array(signature.args[2])(context, builder, dest).data
        mode = ir.Constant(ir.IntType(64), _VML_MODE)
        builder.call(fn, [count, builder.bitcast(src_data, float_ptr), builder.bitcast(dst_data, float_ptr), mode])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _box_rows(bq, step, k, run, bw, bh, bx, by, half):
    """Width, height and centre of ``run`` reference boxes, box ``j`` at ``bq[step * j:]``, into rows ``k ...``
    of the block's arrays, in the reference's order (``widths = x2 - x1``, ``ctr_x = x1 + 0.5 * widths``)."""
    for j in range(run):
        x1 = bq[step * j]
        y1 = bq[step * j + 1]
        widths = bq[step * j + 2] - x1
        heights = bq[step * j + 3] - y1
        bw[k + j] = widths
        bh[k + j] = heights
        bx[k + j] = x1 + half * widths
        by[k + j] = y1 + half * heights


@_jit
def decode(start, stop, out, deltas, boxes, outer_stride, inner, inner_stride, wx, wy, ww, wh, clip, half, sizes,
           rows_per_size, zero):
    """:meth:`detect.ops.coder.BoxCoder.decode` of rows ``r = o * inner + i`` for ``o`` in ``[start, stop)``, in
    one pass, optionally clipped. ``out``, ``deltas`` and ``boxes`` are flat (4 floats a row).

    Row ``r``'s deltas are ``deltas[4r:4r+4]``, its reference box the row ``o * outer_stride + i * inner_stride``
    of ``boxes`` (the boxes broadcast against the deltas, collapsed to two dimensions). Per block of
    :data:`DECODE_BLOCK` rows: the boxes' widths, heights and centres into four arrays (a box shared by the
    classes of a row is computed once and repeated), the scaled, clamped ``dw, dh`` into two and torch's exp of
    them in place (:func:`_torch_exp`), then the corners. Every loop but the boxes' indexes its arrays as
    ``4 * k + c`` from a slice that starts at the block: numba then proves the indices non-negative (no
    wraparound check) and LLVM vectorises the interleaved reads and writes; the same loops written on 2-D arrays
    stayed scalar (1.5 ms against 0.8 ms for 336,000 rows on one thread). With ``sizes`` of shape ``(S, 2)`` as
    ``(H, W)`` the corners are clipped as :func:`clip` does, row ``r`` to ``sizes[r // rows_per_size]``;
    ``(0, 2)`` leaves them unclipped.
    """
    previous = _mkl_local_threads(1)  # see the section's comment: one MKL thread for the vmsExp calls below
    block = DECODE_BLOCK
    ew = np.empty(block, dtype=np.float32)
    eh = np.empty(block, dtype=np.float32)
    bw = np.empty(block, dtype=np.float32)
    bh = np.empty(block, dtype=np.float32)
    bx = np.empty(block, dtype=np.float32)
    by = np.empty(block, dtype=np.float32)
    first, last = start * inner, stop * inner
    do_clip = sizes.shape[0] > 0
    for b0 in range(first, last, block):
        n = min(block, last - b0)
        o = b0 // inner
        i = b0 - o * inner
        k = 0
        if inner == 1 and outer_stride == 1:  # one box per row, in the rows' order
            _box_rows(boxes[4 * b0:4 * (b0 + n)], 4, 0, n, bw, bh, bx, by, half)
            k = n
        while k < n:  # the rows of one outer index at a time
            run = min(n - k, inner - i)
            base = 4 * (o * outer_stride + i * inner_stride)
            if inner_stride == 0:  # one box for the whole run (class-specific deltas): computed once
                _box_rows(boxes[base:base + 4], 0, k, 1, bw, bh, bx, by, half)
                bw[k + 1:k + run] = bw[k]
                bh[k + 1:k + run] = bh[k]
                bx[k + 1:k + run] = bx[k]
                by[k + 1:k + run] = by[k]
            elif inner_stride == 1:
                _box_rows(boxes[base:base + 4 * run], 4, k, run, bw, bh, bx, by, half)
            else:
                _box_rows(boxes[base:base + 4 * inner_stride * (run - 1) + 4], 4 * inner_stride, k, run, bw, bh,
                          bx, by, half)
            k += run
            o += 1
            i = 0
        dq = deltas[4 * b0:4 * (b0 + n)]
        oq = out[4 * b0:4 * (b0 + n)]
        for k in range(n):
            dw = dq[4 * k + 2] / ww
            dh = dq[4 * k + 3] / wh
            ew[k] = clip if dw > clip else dw
            eh[k] = clip if dh > clip else dh
        _torch_exp(n, ew, ew)
        _torch_exp(n, eh, eh)
        for k in range(n):  # the reference's order: pred = d / w * size + ctr, half = 0.5 * (exp * size)
            pred_x = dq[4 * k] / wx * bw[k] + bx[k]
            pred_y = dq[4 * k + 1] / wy * bh[k] + by[k]
            half_w = half * (ew[k] * bw[k])
            half_h = half * (eh[k] * bh[k])
            oq[4 * k] = pred_x - half_w
            oq[4 * k + 1] = pred_y - half_h
            oq[4 * k + 2] = pred_x + half_w
            oq[4 * k + 3] = pred_y + half_h
        if do_clip:  # per image: x into [0, W], y into [0, H], as clip does
            r = b0
            while r < b0 + n:
                s = r // rows_per_size
                end = min(b0 + n, (s + 1) * rows_per_size)
                height = sizes[s, 0]
                width = sizes[s, 1]
                seg = out[4 * r:4 * end]
                for q in range(2 * (end - r)):
                    v = seg[2 * q]
                    v = zero if v < zero else v
                    seg[2 * q] = width if v > width else v
                    v = seg[2 * q + 1]
                    v = zero if v < zero else v
                    seg[2 * q + 1] = height if v > height else v
                r = end
    _mkl_local_threads(previous)


# --- torch's OpenMP team --------------------------------------------------------------------------------------
#
# torch's CPU ops run on an OpenMP team (libgomp in the x86 Linux builds), whose workers keep spinning for a while
# after each parallel region. On a 2-core machine a loop split over Python threads right after a torch op finds
# the second core taken by that spinning worker: the 336,000-row decode took 0.69 ms back to back with itself and
# 0.89-1.20 ms right after a torch op, for some 20 ms. A loop that runs *on* that team instead takes the spinning
# worker's core for itself, as torch's next op would. ``GOMP_parallel(fn, data, threads, 0)`` runs the C function
# ``fn(data)`` on every thread of the calling thread's team (the caller included), so the loop below is a numba
# ``cfunc`` that reads its arguments from an int64 block and runs its share of the tasks (``omp_get_thread_num``
# of ``omp_get_num_threads``). libgomp's team does not survive ``fork`` (torch's own ops hang in a forked child
# whose parent used them), so a forked child keeps to the Python threads of :mod:`detect.ops.dispatch`.

_THREAD_NUM_SYMBOL = "detect_ops_omp_get_thread_num"
_NUM_THREADS_SYMBOL = "detect_ops_omp_get_num_threads"


def _find_team() -> ctypes._CFuncPtr | None:
    """``GOMP_parallel`` of the OpenMP runtime torch's ops run on (registering ``omp_get_thread_num`` and
    ``omp_get_num_threads`` beside it for the JIT), or None where torch's parallel backend is not libgomp."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path) or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded by torch: the same handle, the same teams
        parallel, thread_num, num_threads = lib.GOMP_parallel, lib.omp_get_thread_num, lib.omp_get_num_threads
    except (OSError, AttributeError):
        return None
    parallel.restype = None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    llvm_binding.add_symbol(_THREAD_NUM_SYMBOL, ctypes.cast(thread_num, ctypes.c_void_p).value)
    llvm_binding.add_symbol(_NUM_THREADS_SYMBOL, ctypes.cast(num_threads, ctypes.c_void_p).value)
    return parallel


GOMP_PARALLEL = _find_team()
"""libgomp's ``GOMP_parallel`` as loaded by torch, or None (another OpenMP runtime, or none)."""
_TEAM_PID = os.getpid()


@intrinsic
def _team_share(typingctx, tasks):
    """``(start, stop)`` of the calling OpenMP thread's equal share of ``tasks``."""
    sig = types.UniTuple(types.int64, 2)(tasks)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fnty = ir.FunctionType(i32, [])
        calls = []
        for name in (_THREAD_NUM_SYMBOL, _NUM_THREADS_SYMBOL):
            fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
            calls.append(builder.sext(builder.call(fn, []), i64))
        thread, count = calls
        start = builder.sdiv(builder.mul(args[0], thread), count)
        stop = builder.sdiv(builder.mul(args[0], builder.add(thread, ir.Constant(i64, 1))), count)
        return context.make_tuple(builder, signature.return_type, (start, stop))

    return sig, codegen


@intrinsic
def _address(typingctx, value):
    """The int64 ``value`` as a pointer (for :func:`numba.carray`)."""
    sig = types.voidptr(value)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return sig, codegen


_DECODE_BLOCK_FIELDS = 13


def _decode_team(block):
    """:func:`decode` of this OpenMP thread's share, the arguments read from the int64 ``block`` written by
    :func:`decode_on_team`. Compiled as a ``cfunc`` on first use (:func:`_team_entry`): only where torch's exp and
    libgomp were both found can it link."""
    p = numba.carray(block, _DECODE_BLOCK_FIELDS, dtype=np.int64)
    rows, box_rows, n_sizes = p[3], p[4], p[5]
    out = numba.carray(_address(p[0]), 4 * rows, dtype=np.float32)
    deltas = numba.carray(_address(p[1]), 4 * rows, dtype=np.float32)
    boxes = numba.carray(_address(p[2]), 4 * box_rows, dtype=np.float32)
    sizes = numba.carray(_address(p[6]), (n_sizes, 2), dtype=np.float32)
    c = numba.carray(_address(p[7]), 7, dtype=np.float32)  # wx, wy, ww, wh, clip, half, zero
    start, stop = _team_share(p[8])
    decode(start, stop, out, deltas, boxes, p[9], p[10], p[11], c[0], c[1], c[2], c[3], c[4], c[5], sizes, p[12],
           c[6])


@functools.cache
def _team_entry(fn) -> int:
    """The address of ``fn`` compiled as a ``void(void*)`` ``cfunc`` (or loaded from numba's cache)."""
    return numba.cfunc(types.void(types.voidptr), cache=True, error_model="numpy")(fn).address


def decode_on_team(tasks, threads, out, deltas, boxes, outer_stride, inner, inner_stride, wx, wy, ww, wh, clip, half,
                   sizes, rows_per_size, zero) -> bool:
    """:func:`decode` of all ``tasks`` on ``threads`` threads of torch's OpenMP team (the arguments as
    :func:`decode` takes them; every array C-contiguous), or False, having done nothing, where no team can run
    it (see the section's comment)."""
    if GOMP_PARALLEL is None or TORCH_EXP is None or os.getpid() != _TEAM_PID:
        return False
    constants = np.array([wx, wy, ww, wh, clip, half, zero], dtype=np.float32)
    sizes = np.ascontiguousarray(sizes, dtype=np.float32)
    block = np.array([out.ctypes.data, deltas.ctypes.data, boxes.ctypes.data, len(out) // 4, len(boxes) // 4,
                      sizes.shape[0], sizes.ctypes.data, constants.ctypes.data, tasks, outer_stride, inner,
                      inner_stride, rows_per_size], dtype=np.int64)
    GOMP_PARALLEL(_team_entry(_decode_team), block.ctypes.data, threads, 0)  # ctypes releases the GIL meanwhile
    return True


TEAM = {decode: decode_on_team}
"""The loops that can run on torch's OpenMP team, each with its runner (see :func:`detect.ops.dispatch.run_cpu`)."""


# The two-pass decode (float64, and float32 where torch has no MKL) and the encode: the coder's exp and log stay
# torch's. The loops below prepare their arguments as the same contiguous arrays the reference passes to
# torch.exp / torch.log, and finish the arithmetic afterwards. Without MKL, torch's CPU exp/log mix a SIMD
# polynomial (Sleef) with libm at the tails of each thread's chunk, so recomputing them here could differ in the
# last bit; applying torch's own function to the same array in the same layout cannot.


@_jit
def decode_prepare(start, stop, deltas, scaled, ww, wh, clip):
    """``scaled[0, k] = (deltas[k, 2] / ww).clamp(max=clip)`` and ``scaled[1, k]`` the same of column 3 with
    ``wh``, for rows ``k`` in ``[start, stop)``; torch's clamp keeps NaN."""
    for k in range(start, stop):
        dw = deltas[k, 2] / ww
        dh = deltas[k, 3] / wh
        scaled[0, k] = clip if dw > clip else dw
        scaled[1, k] = clip if dh > clip else dh


@_jit
def decode_finish(start, stop, out, deltas, exps, boxes, outer_stride, inner, inner_stride, wx, wy, half):
    """Decoded rows ``r = o * inner + i`` of ``out (R, 4)`` for ``o`` in ``[start, stop)``.

    Row ``r``'s reference box is ``boxes[o * outer_stride + i * inner_stride]`` (the broadcast of the boxes
    against the deltas, collapsed to two dimensions) and ``exps[:, r]`` holds torch's exp of its scaled
    ``dw, dh``. The reference's order: ``widths = x2 - x1``, ``ctr_x = x1 + 0.5 * widths``, ``pred_x = dx / wx *
    widths + ctr_x``, ``half_w = 0.5 * (exp(dw) * widths)``, corners ``pred -/+ half``.
    """
    for o in range(start, stop):
        for i in range(inner):
            r = o * inner + i
            b = o * outer_stride + i * inner_stride
            x1, y1, x2, y2 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
            widths = x2 - x1
            heights = y2 - y1
            ctr_x = x1 + half * widths
            ctr_y = y1 + half * heights
            pred_x = deltas[r, 0] / wx * widths + ctr_x
            pred_y = deltas[r, 1] / wy * heights + ctr_y
            half_w = half * (exps[0, r] * widths)
            half_h = half * (exps[1, r] * heights)
            out[r, 0] = pred_x - half_w
            out[r, 1] = pred_y - half_h
            out[r, 2] = pred_x + half_w
            out[r, 3] = pred_y + half_h


@_jit
def encode_prepare(start, stop, out, gt, proposals, ratios, wx, wy, half):
    """Rows ``[start, stop)``: deltas' columns 0-1, ``wx * (gt_x - ex_x) / ex_w`` (same for y), into ``out (R,
    4)`` and the size ratios ``gt_w / ex_w``, ``gt_h / ex_h`` whose logs give columns 2-3 into ``ratios (2,
    R)``."""
    for k in range(start, stop):
        ex_w = proposals[k, 2] - proposals[k, 0]
        ex_h = proposals[k, 3] - proposals[k, 1]
        ex_x = proposals[k, 0] + half * ex_w
        ex_y = proposals[k, 1] + half * ex_h
        gt_w = gt[k, 2] - gt[k, 0]
        gt_h = gt[k, 3] - gt[k, 1]
        gt_x = gt[k, 0] + half * gt_w
        gt_y = gt[k, 1] + half * gt_h
        out[k, 0] = wx * (gt_x - ex_x) / ex_w
        out[k, 1] = wy * (gt_y - ex_y) / ex_h
        ratios[0, k] = gt_w / ex_w
        ratios[1, k] = gt_h / ex_h


@_jit
def encode_finish(start, stop, out, logs, ww, wh):
    """Rows ``[start, stop)``: deltas' columns 2-3, ``ww * log(gt_w / ex_w)`` and ``wh * log(gt_h / ex_h)``."""
    for k in range(start, stop):
        out[k, 2] = ww * logs[0, k]
        out[k, 3] = wh * logs[1, k]


# --- clipping -------------------------------------------------------------------------------------------------


@_jit
def clip(start, stop, out, boxes, sizes, rows_per_size, zero):
    """Rows ``k`` in ``[start, stop)`` of ``boxes (R, 4)`` clipped into ``out``: ``min(max(v, 0), bound)`` (NaN
    kept) with bound W for x and H for y of ``sizes[k // rows_per_size]`` as (H, W)."""
    for k in range(start, stop):
        s = k // rows_per_size
        for c in range(4):
            v = boxes[k, c]
            bound = sizes[s, 1 - (c & 1)]
            if v < zero:
                v = zero
            if v > bound:
                v = bound
            out[k, c] = v


# --- RoI Align's gradient -------------------------------------------------------------------------------------
# torchvision's CPU backward visits every (RoI, channel, bin) in turn, recomputing each sampling point's bilinear
# weights once per channel, on one core: in a training step of the tiny Faster R-CNN it was 170 of 600 ms. Here
# the weights are computed once per sampling point and applied to all channels at once, into a channels-last
# gradient (a contiguous vector per feature pixel), images in parallel (an RoI only touches its own image's
# gradient). Each gradient element still receives its terms in torchvision's order (RoI, bin row, bin column,
# sample row, sample column, corner) with the same float32 operations (``grad * w / count``, the positions and
# weights as ``bilinear_interpolate_gradient`` computes them), so the sums are bitwise torchvision's.


@_jit
def roi_align_backward(start, stop, grad_in, grad_out, rois, order, first, scale, offset, grid_h, grid_w):
    """``grad_in (B, H, W, C)`` (zeros on entry) += RoI Align's gradient for images ``[start, stop)``.

    ``grad_out (K, PH, PW, C)`` float32 is the pooled output's gradient channels-last, ``rois (K, 5)`` float32,
    ``order``/``first`` the RoIs of image ``b`` in their own order (``order[first[b]:first[b + 1]]``).
    ``scale``/``offset`` are the spatial scale and 0.5 for ``aligned`` (else 0), float32; ``grid_h``/``grid_w``
    the sampling ratio, or 0 for torchvision's adaptive ``ceil(roi side / bins)``."""
    height, width, channels = grad_in.shape[1], grad_in.shape[2], grad_in.shape[3]
    pooled_h, pooled_w = grad_out.shape[1], grad_out.shape[2]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    fheight = np.float32(height)
    fwidth = np.float32(width)
    for b in range(start, stop):
        for j in range(first[b], first[b + 1]):
            n = order[j]
            start_w = rois[n, 1] * scale - offset
            start_h = rois[n, 2] * scale - offset
            roi_w = rois[n, 3] * scale - offset - start_w
            roi_h = rois[n, 4] * scale - offset - start_h
            if offset == zero:  # not aligned: malformed RoIs count as 1 x 1
                roi_w = one if roi_w < one else roi_w
                roi_h = one if roi_h < one else roi_h
            bin_h = roi_h / np.float32(pooled_h)
            bin_w = roi_w / np.float32(pooled_w)
            samples_h = grid_h if grid_h > 0 else int(np.ceil(roi_h / np.float32(pooled_h)))
            samples_w = grid_w if grid_w > 0 else int(np.ceil(roi_w / np.float32(pooled_w)))
            count = np.float32(samples_h * samples_w)
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    for iy in range(samples_h):
                        y = start_h + np.float32(ph) * bin_h + np.float32(iy + 0.5) * bin_h / np.float32(samples_h)
                        for ix in range(samples_w):
                            x = start_w + np.float32(pw) * bin_w + np.float32(ix + 0.5) * bin_w / np.float32(samples_w)
                            if y < -one or y > fheight or x < -one or x > fwidth:
                                continue
                            yy = zero if y <= zero else y
                            xx = zero if x <= zero else x
                            y_low = int(yy)
                            x_low = int(xx)
                            if y_low >= height - 1:
                                y_low = y_high = height - 1
                                yy = np.float32(y_low)
                            else:
                                y_high = y_low + 1
                            if x_low >= width - 1:
                                x_low = x_high = width - 1
                                xx = np.float32(x_low)
                            else:
                                x_high = x_low + 1
                            ly = yy - np.float32(y_low)
                            lx = xx - np.float32(x_low)
                            hy = one - ly
                            hx = one - lx
                            w1 = hy * hx
                            w2 = hy * lx
                            w3 = ly * hx
                            w4 = ly * lx
                            for c in range(channels):
                                grad_in[b, y_low, x_low, c] += grad_out[n, ph, pw, c] * w1 / count
                            for c in range(channels):
                                grad_in[b, y_low, x_high, c] += grad_out[n, ph, pw, c] * w2 / count
                            for c in range(channels):
                                grad_in[b, y_high, x_low, c] += grad_out[n, ph, pw, c] * w3 / count
                            for c in range(channels):
                                grad_in[b, y_high, x_high, c] += grad_out[n, ph, pw, c] * w4 / count
