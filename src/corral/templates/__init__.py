"""Templates as a service: a team's templates by name (the catalog, backed by the SQL
store and served by the engine) and their builds, run as jobs on the queue.

    catalog.py   TemplateCatalog, TemplateRecord, BuildRequest: build, get, list, delete
    builder.py   one build: base, steps (RUN in a sandbox, COPY from the context), cache,
                 ready check
"""

from corral.templates.catalog import BuildRequest, TemplateCatalog, TemplateRecord

__all__ = ["BuildRequest", "TemplateCatalog", "TemplateRecord"]
