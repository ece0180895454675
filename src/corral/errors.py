"""Every error Corral raises that a caller can catch.

    CorralError
    ├── InvalidRequest            bad input: the call changed nothing
    │   ├── UnknownTemplate
    │   ├── UnknownBackend
    │   ├── InvalidLimits
    │   ├── InvalidLayer          a layer archive holds a `..` path or a link out of the layer
    │   ├── InvalidBuild          a Dockerfile, recipe or E2B template Corral cannot build
    │   ├── InvalidImage          an OCI image's manifest, config or blobs are not valid
    │   ├── CallbackRefused       the server's callback policy refuses the URL (SSRF)
    │   └── UnknownUser           the sandbox has no user of that name or uid
    ├── NotFound                  no such sandbox (or not yours: teams never see each other's)
    │   ├── UnknownLayer          no stored layer has that digest
    │   ├── UnknownVolume         the team has no volume of that name
    │   ├── TemplateNotFound      the caller's team has no template of that name
    │   └── UnknownVm             the team has no vm of that name
    ├── LayerInUse                a template or sandbox still uses the layer
    ├── VolumeInUse               a running sandbox has the volume mounted
    ├── VolumeExists              the team has a volume of that name already
    ├── VmExists                  the team has a vm of that name already
    ├── VmNotReady                the vm's language template is building or failed
    ├── TemplateNotReady          the server's base template is being built: try again
    ├── TemplateInUse             live sandboxes use the template: it cannot be deleted
    ├── BuildFailed               a template build's step or ready check failed
    ├── ImagePullFailed           skopeo could not fetch the image (registry, auth, archive)
    ├── IdempotencyConflict       an idempotency key already names a job with another spec
    ├── AuthError
    │   ├── Unauthenticated       no API key, or an unknown or revoked one
    │   └── Forbidden             the key may not do that
    ├── QuotaExceeded             the team's quota refuses it
    ├── RateLimited               the API key's request rate or open streams are at its limit
    ├── CapacityExceeded          the host has no room for it (memory committed)
    ├── IsolationUnavailable      the host cannot give the isolation asked for
    ├── SchemaTooNew              the database was migrated by a newer Corral than this one
    ├── ServerUnavailable         the SDK or CLI could not reach the Corral server
    │   └── ServerUntrusted       its TLS certificate did not verify (no CA file trusts it)
    ├── WaitTimedOut              a wait ran out of time (also a TimeoutError)
    ├── SandboxError
    │   ├── SandboxStartFailed
    │   ├── SandboxNotRunning     destroyed, or paused when the call needs it running
    │   ├── GuestError            the guest agent broke the protocol or died
    │   ├── SnapshotUnavailable   the sandbox's root is not made of layers (template `host`)
    │   └── PortClosed            nothing listens on the port asked for inside the sandbox
    ├── CommandError              a command could not be started (bad cwd, bad user …)
    └── FileError                 a file operation inside the sandbox failed
        ├── FileNotFound
        ├── FileExists
        ├── NotADirectory
        ├── IsADirectory
        ├── PermissionDenied
        ├── DirectoryNotEmpty
        └── NoSpace

The default message of each class is its docstring, so ``raise UnknownTemplate()`` still
tells the user something useful; callers pass a message that names the bad value and
what to do instead.
"""

from __future__ import annotations


class CorralError(Exception):
    """Corral failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class InvalidRequest(CorralError, ValueError):
    """The request is invalid; nothing was changed."""


class UnknownTemplate(InvalidRequest):
    """No template has that name."""


class UnknownBackend(InvalidRequest):
    """No isolation backend has that name."""


class InvalidLimits(InvalidRequest):
    """A resource limit is out of range."""


class InvalidLayer(InvalidRequest):
    """The layer's archive holds an entry Corral refuses (a `..` path, a hard link out of
    the layer, a write through a symlink); fix the archive and import it again."""


class InvalidBuild(InvalidRequest):
    """The build file holds something Corral cannot build; the message names the line and
    what to write instead."""


class InvalidImage(InvalidRequest):
    """The OCI image's index, manifest, config or a blob is missing, malformed or does not
    match its digest; fix the image (or its archive) and import it again."""


class CallbackRefused(InvalidRequest):
    """The server's callback policy refuses this callback URL; use a public address, or
    ask the operator to allow it (CORRAL_CALLBACK_ALLOW)."""


class UnknownUser(InvalidRequest):
    """The sandbox has no user of that name or uid; the message names the users it has."""


class NotFound(CorralError):
    """No such sandbox; check the id with `corral sandbox list`."""


class UnknownLayer(NotFound):
    """No stored layer has that digest."""


class UnknownVolume(NotFound):
    """The team has no volume of that name; `corral volume list` shows its volumes."""


class VolumeInUse(CorralError):
    """A running sandbox has the volume mounted; kill it first, then delete the volume."""


class VolumeExists(CorralError):
    """The team has a volume of that name already; choose another name or delete it."""


class TemplateNotFound(NotFound):
    """Your team has no template of that name; list them with `corral template list`."""


class UnknownVm(NotFound):
    """The team has no vm of that name; `corral vm list --all` shows its vms."""


class VmExists(CorralError):
    """The team has a vm of that name already; choose another name or clean it."""


class TemplateNotReady(CorralError):
    """The server is building that template (its `base`): try again in a minute or two."""


class VmNotReady(CorralError):
    """The vm's language template is not ready: wait for its build, or create it again."""


class LayerInUse(CorralError):
    """A template or sandbox still uses the layer; remove them first."""


class TemplateInUse(CorralError):
    """Live sandboxes use the template; kill them before deleting it."""


class BuildFailed(CorralError):
    """The template build failed; its error names the step and ends with its log."""


class ImagePullFailed(CorralError):
    """skopeo could not fetch the image: check the reference, the registry's address and
    credentials, or the archive's path."""


class IdempotencyConflict(CorralError):
    """That idempotency key was already used for a job with another spec; use a new key."""


class AuthError(CorralError):
    """The request was not authorized."""


class Unauthenticated(AuthError):
    """No valid API key: pass one with --api-key or CORRAL_API_KEY."""


class Forbidden(AuthError):
    """This API key may not do that."""


class QuotaExceeded(CorralError):
    """The team's quota does not allow this; destroy sandboxes or ask for a larger quota."""


class RateLimited(CorralError):
    """Too many requests with this API key: wait `retry_after` seconds and try again."""

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CapacityExceeded(CorralError):
    """This host cannot hold the sandbox: its memory is committed to live sandboxes."""


class IsolationUnavailable(CorralError):
    """The host cannot provide the isolation asked for; run `corral doctor`."""


class SchemaTooNew(CorralError):
    """The database's schema is newer than this Corral knows: upgrade Corral."""


class ServerUnavailable(CorralError):
    """The Corral server did not answer; is `corral server` running at that address?"""


class ServerUntrusted(ServerUnavailable):
    """The server's TLS certificate could not be verified; trust its CA with --ca-file."""


class WaitTimedOut(CorralError, TimeoutError):
    """The wait ran out of time before what it waited for happened; it may still happen."""


class SandboxError(CorralError):
    """The sandbox failed."""


class SandboxStartFailed(SandboxError):
    """The sandbox could not be started."""


class SandboxNotRunning(SandboxError):
    """The sandbox is not running."""


class GuestError(SandboxError):
    """The guest agent inside the sandbox stopped answering or broke the protocol."""


class SnapshotUnavailable(SandboxError):
    """The sandbox cannot be snapshotted: its root is not made of a template's layers."""


class PortClosed(SandboxError):
    """Nothing listens on that port inside the sandbox: start a server there first."""


class CommandError(CorralError):
    """The command could not be started."""


class FileError(CorralError):
    """The file operation failed."""


class FileNotFound(FileError):
    """No such file or directory in the sandbox."""


class FileExists(FileError):
    """A file already exists at that path in the sandbox."""


class NotADirectory(FileError):
    """A component of the path is not a directory."""


class IsADirectory(FileError):
    """The path is a directory; the operation needs a file."""


class PermissionDenied(FileError):
    """The sandbox user may not do that to this path."""


class DirectoryNotEmpty(FileError):
    """The directory is not empty; pass recursive=True to remove it with its contents."""


class NoSpace(FileError):
    """The sandbox's writable storage is full; raise its disk limit or delete files."""
