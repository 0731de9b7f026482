"""Choosing groups of heads from data, once, when a model is converted.

``measure`` collects input moments of every attention layer on calibration images,
``objective`` prices what mean-pooling a group of heads loses, ``partition`` searches the
grouping that loses least, ``selection`` checks candidates against the whole model's output,
and ``plan`` puts these together for :func:`kdgqa.convert`.
"""
