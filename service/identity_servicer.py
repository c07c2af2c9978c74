"""IdentityService: register decoders (streamed into the store under a consent check),
list, inspect and delete identities, and keep their consent records."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

import grpc
from facemux.models.errors import InvalidInputError
from facemux.service import convert
from facemux.service.boundary import unary
from facemux.service.consent import (
    Admission,
    consent_for_upload,
    consent_from_proto,
    consent_to_proto,
    validate_consent,
)
from facemux.service.runtime import Runtime
from facemux.service.settings import Settings
from facemux.service.store import IdentityRecord, Store, VersionRecord, validate_name
from facemux.service.uploads import UploadCheck
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import identity_service_pb2_grpc as igrpc

log = logging.getLogger(__name__)


def identity_to_proto(rec: IdentityRecord) -> ipb.Identity:
    def version(v: VersionRecord) -> ipb.IdentityVersion:
        return ipb.IdentityVersion(
            version=v.version,
            created_at=convert.timestamp(v.created_at),
            decoder_fingerprint=v.decoder_fingerprint,
            encoder_fingerprint=v.encoder_fingerprint,
            preset=v.preset,
            resolution=v.resolution,
            size_bytes=v.size_bytes,
            source=ipb.VERSION_SOURCE_TRAINED
            if v.source == "trained"
            else ipb.VERSION_SOURCE_UPLOADED,
            job_id=v.job_id,
            summary_json=json.dumps(v.summary, sort_keys=True) if v.summary else "",
        )

    return ipb.Identity(
        name=rec.name,
        display_name=rec.display_name,
        default_version=rec.default_version,
        versions=[version(v) for v in rec.versions],
        consent=consent_to_proto(rec.consent),
        created_at=convert.timestamp(rec.created_at),
        consent_history=[consent_to_proto(c) for c in rec.consent_history],
    )


class IdentityServicer(igrpc.IdentityServiceServicer):
    def __init__(self, settings: Settings, runtime: Runtime, store: Store) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store

    @unary
    async def RegisterIdentity(
        self,
        request_iterator: AsyncIterator[ipb.RegisterIdentityRequest],
        context: grpc.aio.ServicerContext,
    ) -> ipb.RegisterIdentityResponse:
        meta: ipb.RegisterIdentityMetadata | None = None
        admitted: Admission | None = None
        # Streamed into a staging file of the store, never held in memory; the file goes
        # when the upload fails or the caller goes away (the with block's exit).
        with self.store.new_upload() as upload:
            check = UploadCheck(self.settings.max_checkpoint_bytes)
            async for part in request_iterator:
                kind = part.WhichOneof("part")
                if kind == "metadata":
                    if meta is not None:
                        raise InvalidInputError("metadata was sent twice; send it once, first")
                    meta = part.metadata
                    validate_name(meta.name)
                    # Before any bytes arrive: no consent, no upload.
                    admitted = await asyncio.to_thread(
                        consent_for_upload, self.store, meta.name, meta.consent
                    )
                    check.declared(meta.size_bytes)
                elif kind == "chunk":
                    if meta is None:
                        raise InvalidInputError("the first message must carry the metadata")
                    check.chunk(part.chunk)
                    await asyncio.to_thread(upload.write, part.chunk)
                else:
                    raise InvalidInputError("empty RegisterIdentity message")
            if meta is None or admitted is None:
                raise InvalidInputError("RegisterIdentity stream had no metadata")
            check.complete()
            if meta.sha256 and upload.sha256 != meta.sha256.lower():
                raise InvalidInputError(
                    "checkpoint sha256 does not match metadata.sha256: upload corrupted"
                )

            def register() -> tuple[IdentityRecord, int]:
                assert meta is not None and admitted is not None
                dmeta = self.runtime.validate_decoder_upload(upload.path)
                record = VersionRecord.for_decoder(dmeta)
                rec = self.store.add_version(
                    meta.name,
                    upload,
                    record,
                    display_name=meta.display_name,
                    make_default=meta.make_default,
                    # Checked again under the store's lock: a revocation, deletion or
                    # creation of the identity during the upload refuses the version.
                    consent=admitted.new_identity_consent,
                    expect=admitted.expect,
                )
                return rec, record.version

            rec, version = await asyncio.to_thread(register)
        log.info("registered identity %s v%d", rec.name, version)
        return ipb.RegisterIdentityResponse(identity=identity_to_proto(rec), version=version)

    @unary
    async def ListIdentities(
        self, request: ipb.ListIdentitiesRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ListIdentitiesResponse:
        size = request.page_size or 100
        after = ""
        if request.page_token:
            try:
                after = base64.b64decode(request.page_token, altchars=b"-_", validate=True).decode()
            except ValueError:
                raise InvalidInputError("page_token is not one this server issued") from None
        records = [r for r in await asyncio.to_thread(self.store.list_identities) if r.name > after]
        page = records[:size]
        token = ""
        if len(records) > size:
            token = base64.urlsafe_b64encode(page[-1].name.encode()).decode()
        return ipb.ListIdentitiesResponse(
            identities=[identity_to_proto(r) for r in page], next_page_token=token
        )

    @unary
    async def GetIdentity(
        self, request: ipb.GetIdentityRequest, context: grpc.aio.ServicerContext
    ) -> ipb.GetIdentityResponse:
        validate_name(request.name)
        rec = await asyncio.to_thread(self.store.get, request.name)
        return ipb.GetIdentityResponse(identity=identity_to_proto(rec))

    @unary
    async def DeleteIdentity(
        self, request: ipb.DeleteIdentityRequest, context: grpc.aio.ServicerContext
    ) -> ipb.DeleteIdentityResponse:
        validate_name(request.name)
        deleted, gone = await asyncio.to_thread(self.store.delete, request.name, request.version)
        self.runtime.cache.evict(request.name, 0 if gone else request.version)
        log.info("deleted identity %s versions %s", request.name, deleted)
        return ipb.DeleteIdentityResponse(deleted_versions=deleted, identity_deleted=gone)

    @unary
    async def SetDefaultVersion(
        self, request: ipb.SetDefaultVersionRequest, context: grpc.aio.ServicerContext
    ) -> ipb.SetDefaultVersionResponse:
        validate_name(request.name)
        if request.version == 0:
            raise InvalidInputError("version must be a stored version number (1 or more)")
        rec = await asyncio.to_thread(self.store.set_default, request.name, request.version)
        return ipb.SetDefaultVersionResponse(identity=identity_to_proto(rec))

    @unary
    async def RevokeConsent(
        self, request: ipb.RevokeConsentRequest, context: grpc.aio.ServicerContext
    ) -> ipb.RevokeConsentResponse:
        validate_name(request.name)
        rec = await asyncio.to_thread(self.store.revoke_consent, request.name, request.reason[:500])
        self.runtime.cache.evict(request.name)
        return ipb.RevokeConsentResponse(identity=identity_to_proto(rec))

    @unary
    async def RecordConsent(
        self, request: ipb.RecordConsentRequest, context: grpc.aio.ServicerContext
    ) -> ipb.RecordConsentResponse:
        validate_name(request.name)
        given = request.consent
        if given.HasField("revoked_at") or given.revocation_reason:
            raise InvalidInputError(
                "consent.revoked_at and consent.revocation_reason are set by the server "
                "(RevokeConsent); leave them empty"
            )
        record = validate_consent(consent_from_proto(given))
        rec = await asyncio.to_thread(self.store.record_consent, request.name, record)
        log.info("new consent recorded for identity %s", rec.name)
        return ipb.RecordConsentResponse(identity=identity_to_proto(rec))
