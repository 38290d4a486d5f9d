"""The error-code table: the one place that knows each code, its SDK code and its meaning."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Code(IntEnum):
    NOT_SERVING = 100
    UNKNOWN_CODE = 101
    WRONG_PASSWORD = 102
    DOMAIN_MISMATCH = 103
    NO_MATCHING_ITEM = 104
    BAD_PROTOCOL = 105
    PRODUCT_MISMATCH = 106
    INCOMPATIBLE_VERSION = 107
    DEPLOYMENT_MISMATCH = 108
    EDITION_MISMATCH = 109
    EXPIRED = 111
    NOT_YET_EFFECTIVE = 112
    REVOKED = 113
    VALIDATION_FIELD_MISMATCH = 114
    TYPE_INCOMPATIBLE = 115
    LIMIT_EXCEEDED = 120
    UNKNOWN_ORGANIZATION = 121
    CODE_ORG_MISMATCH = 122
    NO_CODE_NOR_ORG = 123
    ITEM_MISSING = 124
    QUOTA_EXCEEDED_BY_REQUEST = 130
    CLONE_DETECTED = 151
    CLOCK_BEHIND = 160


MESSAGES: dict[Code, str] = {
    Code.NOT_SERVING: "this server does not serve requests now (standby, or not set up)",
    Code.UNKNOWN_CODE: "the handshake code does not exist",
    Code.WRONG_PASSWORD: "wrong session password",
    Code.DOMAIN_MISMATCH: "the domain does not match the handshake code",
    Code.NO_MATCHING_ITEM: "no license item matches; check the handshake code and the client settings",
    Code.BAD_PROTOCOL: "the request is not of a supported protocol version",
    Code.PRODUCT_MISMATCH: "no license item of the handshake code covers this product",
    Code.INCOMPATIBLE_VERSION: "incompatible version",
    Code.DEPLOYMENT_MISMATCH: "no license item of the handshake code covers this deployment type",
    Code.EDITION_MISMATCH: "no license item of the handshake code covers this edition",
    Code.EXPIRED: "the license has expired",
    Code.NOT_YET_EFFECTIVE: "the license is not yet effective",
    Code.REVOKED: "the license item is invalid or revoked",
    Code.VALIDATION_FIELD_MISMATCH: "the validation field does not match the handshake code's configuration",
    Code.TYPE_INCOMPATIBLE: "the license type is not compatible with the request",
    Code.LIMIT_EXCEEDED: "usage has exceeded its limit",
    Code.UNKNOWN_ORGANIZATION: "the organization id is unknown or has no default handshake code",
    Code.CODE_ORG_MISMATCH: "the handshake code does not belong to the organization id",
    Code.NO_CODE_NOR_ORG: "neither a handshake code nor an organization id was given",
    Code.ITEM_MISSING: "a license item the handshake code depends on is missing",
    Code.QUOTA_EXCEEDED_BY_REQUEST: "the request asks for more than the license item's quantity",
    Code.CLONE_DETECTED: "device clone detected: the same client UUID is in use on another device",
    Code.CLOCK_BEHIND: "server clock is behind its records",
}


# What to do next, said after every refusal's message: the field to fix or the command to run.
NEXT: dict[Code, str] = {
    Code.NOT_SERVING: "retry on the next server of the list (GET /api/v1/servers)",
    Code.UNKNOWN_CODE: "check handshakeCode; the admin lists the codes with `ltsctl codes list`",
    Code.WRONG_PASSWORD: "send the code's session password in sessionPassword (the admin sets it with "
                         "`ltsctl codes edit NAME --prompt-password`)",
    Code.DOMAIN_MISMATCH: "send the page's domain in domain, or have the admin add it to the code "
                          "(`ltsctl codes edit NAME --domains ...`)",
    Code.NO_MATCHING_ITEM: "have the admin add license items to the code (`ltsctl codes edit NAME --items ...`)",
    Code.BAD_PROTOCOL: "update the client library",
    Code.PRODUCT_MISMATCH: "check product, or have the admin add an item for it to the code (`ltsctl items list`)",
    Code.INCOMPATIBLE_VERSION: "use a client version the license allows",
    Code.DEPLOYMENT_MISMATCH: "check deploymentType, or have the admin add an item for it to the code",
    Code.EDITION_MISMATCH: "check edition, or have the admin add an item of that edition to the code",
    Code.EXPIRED: "ask the vendor for a renewed license file and import it (`ltsctl licenses import FILE`)",
    Code.NOT_YET_EFFECTIVE: "wait for the item's start date, or ask the vendor for a corrected file",
    Code.REVOKED: "the admin restores it with `ltsctl items restore ITEM`",
    Code.VALIDATION_FIELD_MISMATCH: "send the value the code allows (appId, processName), or have the admin add it "
                                    "(`ltsctl codes edit NAME`)",
    Code.TYPE_INCOMPATIBLE: "send the fields the item's license type needs (a per-domain item needs domain)",
    Code.LIMIT_EXCEEDED: "free seats (`ltsctl devices list ITEM`, `ltsctl devices release ITEM DEVICE`) or buy more",
    Code.UNKNOWN_ORGANIZATION: "check organizationId, or send a handshakeCode; `ltsctl codes list` shows the codes",
    Code.CODE_ORG_MISMATCH: "send the organizationId the code belongs to, or leave organizationId out",
    Code.NO_CODE_NOR_ORG: "send handshakeCode (or organizationId to use its default codes)",
    Code.ITEM_MISSING: "have the admin fix the code's items (`ltsctl codes edit NAME --items ...`) or import the "
                       "license that holds the item",
    Code.QUOTA_EXCEEDED_BY_REQUEST: "ask for at most the item's quantity in instances",
    Code.CLONE_DETECTED: "give each device its own clientUuid; a replaced machine's binding is reset by the admin "
                         "(`ltsctl devices reset-binding CLIENT`)",
    Code.CLOCK_BEHIND: "ask the next server of the list; the admin fixes the server's clock or runs "
                       "`ltsctl clock accept`",
}


def sdk_code(code: Code) -> int:
    """The code as client SDKs see it."""
    return -20000 - int(code)


@dataclass(frozen=True)
class Refusal:
    """A licensing refusal: the code plus a message a person can act on."""

    code: Code
    detail: str = ""
    next_step: str | None = None  # instead of the code's usual next step (NEXT), when it does not fit

    @property
    def message(self) -> str:
        text = f"{MESSAGES[self.code]}: {self.detail}" if self.detail else MESSAGES[self.code]
        step = self.next_step or NEXT.get(self.code)
        return f"{text}; {step}" if step else text

    def to_json(self) -> dict[str, object]:
        return {"code": int(self.code), "sdkCode": sdk_code(self.code), "message": self.message}
