"""`/v1/files`: uploads kept in memory for the life of the server."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from .errors import Handler, RequestError, invalid_request, not_found

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


@dataclass
class StoredFile:
    filename: str
    purpose: str
    content: bytes
    id: str = field(default_factory=lambda: "file-" + uuid.uuid4().hex[:24])
    created_at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class FileStore:
    def __init__(self) -> None:
        self._files: dict[str, StoredFile] = {}

    def add(self, stored: StoredFile) -> StoredFile:
        self._files[stored.id] = stored
        return stored

    def find(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def get(self, file_id: str) -> StoredFile:
        """The file, else a RequestError with OpenAI's 404."""
        stored = self._files.get(file_id)
        if stored is None:
            raise RequestError(not_found(f"No such File object: {file_id}", param="id"))
        return stored

    # --- HTTP handlers -----------------------------------------------------------------------

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/v1/files", self.upload),
            ("GET", "/v1/files", self.list_files),
            ("GET", "/v1/files/{file_id}", self.retrieve),
            ("DELETE", "/v1/files/{file_id}", self.delete),
            ("GET", "/v1/files/{file_id}/content", self.content),
        ]

    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise RequestError(invalid_request("Uploads must be multipart/form-data with 'file' and 'purpose'."))
        filename, content, purpose = None, None, None
        reader = await request.multipart()
        async for part in reader:
            if part.name == "file":
                filename, content = part.filename or "upload", await part.read()
            elif part.name == "purpose":
                purpose = await part.text()
        if content is None:
            raise RequestError(invalid_request("Missing required parameter: 'file'.", param="file"))
        if purpose not in PURPOSES:
            raise RequestError(
                invalid_request(
                    f"Invalid value for 'purpose': {purpose!r}. Supported values are: {', '.join(PURPOSES)}.",
                    param="purpose",
                )
            )
        stored = self.add(StoredFile(filename=filename, purpose=purpose, content=bytes(content)))
        return web.json_response(stored.to_json())

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        data = [f.to_json() for f in reversed(self._files.values()) if purpose in (None, f.purpose)]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def retrieve(self, request: web.Request) -> web.Response:
        return web.json_response(self.get(request.match_info["file_id"]).to_json())

    async def delete(self, request: web.Request) -> web.Response:
        stored = self.get(request.match_info["file_id"])
        del self._files[stored.id]
        return web.json_response({"id": stored.id, "object": "file", "deleted": True})

    async def content(self, request: web.Request) -> web.Response:
        stored = self.get(request.match_info["file_id"])
        return web.Response(body=stored.content, content_type="application/octet-stream")
