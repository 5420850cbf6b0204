# The figures of the defaults for people (issue 23): boxes per shapes scene at the model's threshold and at the
# default 0.25, and an annotated copy's size as JPEG and as PNG. Run: python benchmarks/page_defaults.py (~30 s).
import io, numpy as np
from PIL import Image
from detect import Detector
from detect.data.shapes import ShapesDataset
from detect.drawing import draw_detections, encode_like
det = Detector("faster_rcnn", device="cpu")
ds = ShapesDataset()
low, high = [], []
for i in range(20):
    img, _ = ds[i]
    r = det(img, score_threshold=0.0); low.append(len(r)); high.append(len(det(img)))
print(f"boxes per scene over 20 shapes scenes: model threshold 0.01 {np.mean(low):.1f}, default 0.25 {np.mean(high):.1f}")
img, _ = ds[3]
big = np.asarray(Image.fromarray(img).resize((1280, 1280), Image.BICUBIC))
buf = io.BytesIO(); Image.fromarray(big).save(buf, format="JPEG", quality=90); src = len(buf.getvalue())
r = det(big)
pic = draw_detections(big, r.detections, det.class_names)
print(f"1280x1280 JPEG input {src/1024:.0f} KB: annotated as JPEG {len(encode_like(pic, 'a.jpg'))/1024:.0f} KB, as PNG {len(encode_like(pic, 'a.png'))/1024:.0f} KB")
