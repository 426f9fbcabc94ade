// The console's HTTP API, /api/v1, as used by the pages: JSON in and out, the session cookie
// set by login. Every failure becomes an ApiError carrying the API's own message.

/** A refused or failed request: `status` (0 when the console could not be reached) and the
 * message from the API's `{"error": "..."}` body. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls `method path` with an optional JSON body; resolves to the parsed JSON (or null). */
export async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch("/api/v1" + path, init);
  } catch (e) {
    throw new ApiError(0, "The console cannot be reached: check that it is running, then retry.");
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (e) {
      data = null;
    }
  }
  if (!response.ok) {
    const message = data && typeof data.error === "string"
      ? data.error
      : `The console answered ${response.status} ${response.statusText}.`;
    throw new ApiError(response.status, message);
  }
  return data;
}

/** Query string from an object, skipping empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? "?" + s : "";
}
