// Media Source Extensions player for magi-serve's live fragmented mp4 (ftyp + moov init segment, then one
// moof + mdat fragment per frame). Bytes arrive in file order, in pieces of any size (WebSocket binary messages
// or a fetch() body); the player waits until the whole init segment is there, reads the H.264 codec string from
// its avcC box, opens a SourceBuffer of that type and appends everything in order, one appendBuffer at a time.

const CONTAINERS = new Set(["moov", "trak", "mdia", "minf", "stbl"]);
const SAMPLE_ENTRIES = new Set(["avc1", "avc3"]);
// An avc1 sample entry's fixed fields before its child boxes (ISO/IEC 14496-12 VisualSampleEntry): 6 reserved,
// data_reference_index, 16 pre-defined/reserved, width, height, resolutions, reserved, frame_count,
// compressorname, depth, pre-defined.
const VISUAL_SAMPLE_ENTRY_BYTES = 78;

function fourcc(bytes, at) {
  return String.fromCharCode(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]);
}

// The boxes in bytes[start, end) as {type, start (of the header), body (first payload byte), end}; stops at
// a box whose header or payload is not all there (`complete` false then).
function boxes(bytes, start, end) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const found = [];
  let at = start;
  while (at + 8 <= end) {
    let size = view.getUint32(at);
    const type = fourcc(bytes, at + 4);
    let header = 8;
    if (size === 1) {
      if (at + 16 > end) return { found, complete: false };
      size = Number(view.getBigUint64(at + 8));
      header = 16;
    } else if (size === 0) {
      size = end - at; // extends to the end of its container
    }
    if (size < header) throw new Error(`malformed mp4: box '${type}' at byte ${at} has size ${size}`);
    if (at + size > end) return { found, complete: false, partial: { type, start: at } };
    found.push({ type, start: at, body: at + header, end: at + size });
    at += size;
  }
  return { found, complete: at === end };
}

// Byte length of the init segment (everything up to the end of the top-level moov) once it is complete in
// `bytes`, else null.
export function initSegmentLength(bytes) {
  const { found } = boxes(bytes, 0, bytes.length);
  const moov = found.find((b) => b.type === "moov");
  return moov ? moov.end : null;
}

// 'avc1.PPCCLL' (profile, constraint flags, level in hex) from the first avcC box of the init segment.
export function codecString(bytes) {
  const search = (start, end) => {
    for (const box of boxes(bytes, start, end).found) {
      if (CONTAINERS.has(box.type)) {
        const inner = search(box.body, box.end);
        if (inner) return inner;
      } else if (box.type === "stsd") {
        const inner = search(box.body + 8, box.end); // version/flags + entry_count
        if (inner) return inner;
      } else if (SAMPLE_ENTRIES.has(box.type)) {
        const inner = search(box.body + VISUAL_SAMPLE_ENTRY_BYTES, box.end);
        if (inner) return `${box.type}.${inner}`;
      } else if (box.type === "avcC") {
        // AVCDecoderConfigurationRecord: configurationVersion, AVCProfileIndication, profile_compatibility,
        // AVCLevelIndication.
        const hex = (v) => v.toString(16).padStart(2, "0");
        return hex(bytes[box.body + 1]) + hex(bytes[box.body + 2]) + hex(bytes[box.body + 3]);
      }
    }
    return null;
  };
  return search(0, bytes.length);
}

function concat(pieces) {
  const total = pieces.reduce((n, p) => n + p.byteLength, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of pieces) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

export class MsePlayer {
  // video: the <video> element; onError(message): called once on the first failure; onCodec(mime): when known.
  constructor(video, { onError = () => {}, onCodec = () => {} } = {}) {
    this.video = video;
    this.onError = onError;
    this.onCodec = onCodec;
    this.head = []; // pieces received before the init segment was complete
    this.headBytes = 0;
    this.queue = []; // pieces waiting for the SourceBuffer
    this.sourceBuffer = null;
    this.ended = false;
    this.failed = false;
    this.bytesAppended = 0;
    if (typeof MediaSource === "undefined") {
      this.fail("this browser has no Media Source Extensions (MediaSource): the live video cannot play");
      return;
    }
    this.mediaSource = new MediaSource();
    this.url = URL.createObjectURL(this.mediaSource);
    this.opened = new Promise((resolve) => this.mediaSource.addEventListener("sourceopen", resolve, { once: true }));
    video.src = this.url;
  }

  fail(message) {
    if (this.failed) return;
    this.failed = true;
    this.onError(message);
  }

  // The next bytes of the mp4, in order.
  push(piece) {
    if (this.failed) return;
    const bytes = piece instanceof Uint8Array ? piece : new Uint8Array(piece);
    if (bytes.byteLength === 0) return;
    if (this.sourceBuffer || this.head === null) {
      this.queue.push(bytes);
      this.pump();
      return;
    }
    this.head.push(bytes);
    this.headBytes += bytes.byteLength;
    const joined = concat(this.head);
    this.head = [joined];
    let length;
    try {
      length = initSegmentLength(joined);
    } catch (e) {
      this.fail(`the video stream is not a valid mp4: ${e.message}`);
      return;
    }
    if (length === null) return; // wait for the rest of the init segment
    let codec;
    try {
      codec = codecString(joined.subarray(0, length));
    } catch (e) {
      this.fail(`cannot read the codec from the mp4 init segment: ${e.message}`);
      return;
    }
    if (!codec) {
      this.fail("the mp4 init segment has no H.264 (avc1/avcC) video track");
      return;
    }
    const mime = `video/mp4; codecs="${codec}"`;
    this.head = null; // from now on pieces go to the queue (while the SourceBuffer is being opened too)
    this.queue.push(joined);
    this.open(mime);
  }

  async open(mime) {
    this.mime = mime;
    this.onCodec(mime);
    if (!MediaSource.isTypeSupported(mime)) {
      this.fail(`this browser cannot play ${mime} through Media Source Extensions (no H.264 decoder?)`);
      return;
    }
    await this.opened;
    try {
      this.sourceBuffer = this.mediaSource.addSourceBuffer(mime);
    } catch (e) {
      this.fail(`addSourceBuffer(${mime}) failed: ${e.message}`);
      return;
    }
    this.sourceBuffer.addEventListener("updateend", () => this.pump());
    this.sourceBuffer.addEventListener("error", () => this.fail("the browser rejected a piece of the mp4 stream"));
    this.pump();
  }

  // No more bytes will come: end the stream once everything queued is appended.
  end() {
    this.ended = true;
    this.pump();
  }

  pump() {
    const sb = this.sourceBuffer;
    if (this.failed || !sb || sb.updating) return;
    if (this.queue.length === 0) {
      if (this.ended && this.mediaSource.readyState === "open") this.mediaSource.endOfStream();
      return;
    }
    // Everything waiting goes in one append: one fragment per frame would otherwise be one append each.
    const bytes = this.queue.length === 1 ? this.queue[0] : concat(this.queue);
    this.queue = [];
    try {
      sb.appendBuffer(bytes);
      this.bytesAppended += bytes.byteLength;
    } catch (e) {
      if (e.name === "QuotaExceededError" && this.evict()) {
        this.queue.unshift(bytes); // retried on the updateend of the removal
        return;
      }
      this.fail(`appendBuffer failed: ${e.name}: ${e.message}`);
      return;
    }
    if (!this.playing) {
      // Once: a paused video waiting for data does not stop by itself, and a viewer's pause is theirs to undo.
      this.playing = true;
      this.video.play().catch(() => {});
    }
  }

  // Drops what lies well behind the playhead so a long video fits the browser's SourceBuffer quota.
  evict() {
    const sb = this.sourceBuffer;
    const upTo = this.video.currentTime - 5;
    if (sb.buffered.length === 0 || upTo <= sb.buffered.start(0)) return false;
    sb.remove(sb.buffered.start(0), upTo);
    return true;
  }

  close() {
    this.failed = true; // nothing more is appended
    if (this.url) URL.revokeObjectURL(this.url);
  }
}
