"""Nightly refresh: versioned data with stable ids, warm-started teachers and student, a quality gate,
an atomic ``current`` pointer with a promotion history, rollback and an export for serving.

Layout under a run URI (see :class:`~hetcomp_dist.refresh.layout.Layout`)::

    <run>/data/v0001/                     a dataset version (train/valid/test, id maps, events, meta; manifest)
    <run>/versions/v0001/teachers/<t>/    the version's teachers (trajectory, checkpoints)
    <run>/versions/v0001/student/         the candidate student (distill output)
    <run>/versions/v0001/report/          the gate's decision and reasons, the teachers' fate (manifest)
    <run>/versions/v0001/export/          embeddings and top-K by original ids (manifest)
    <run>/current                         the pointer: version, export manifest sha256, time, gate figures
    <run>/promotions/000001.json          one object per promotion or rollback, never rewritten
"""
